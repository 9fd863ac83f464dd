"""BERT uncased WordPiece tokenizer (the one every BLIP checkpoint uses), built on the `tokenizers` package.

Matches transformers' `BertTokenizerFast` loaded from the same folder: encoding (normaliser, pre-tokeniser, WordPiece,
`[CLS] ... [SEP]` template, special tokens written literally in the text) and decoding (the WordPiece decoder with its
own per-token cleanup, unknown ids dropped, then the whole-string `clean_up_tokenization_spaces` rules only when the
folder's tokenizer_config.json turns them on; transformers 5 defaults them to off).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, VOCAB_FILE)  # what a saved tokenizer consists of
SPECIAL_ROLES = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# transformers' `clean_up_tokenization`: applied to the decoded string when clean_up_tokenization_spaces is on.
CLEANUP_RULES = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class BlipTokenizer:
    """`tokenizer(texts)` -> (input_ids, attention_mask); `decode(ids)` -> text. Ids past the vocabulary ([DEC]=30522,
    [ENC]=30523 for bert-base-uncased) are never produced by encoding and are dropped by decoding."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None):
        config = dict(config or {})
        self.special_tokens = {role: _token_text(config.get(role, default)) for role, default in SPECIAL_ROLES.items()}
        self.do_lower_case = bool(config.get("do_lower_case", True))
        self.strip_accents = config.get("strip_accents")
        self.tokenize_chinese_chars = bool(config.get("tokenize_chinese_chars", True))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.model_max_length = int(config.get("model_max_length", 512))

        missing = [t for t in self.special_tokens.values() if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the vocabulary has no {', '.join(missing)}: not a BERT WordPiece vocabulary")
        # transformers' BertTokenizer rebuilds this pipeline from tokenizer_config.json, whatever tokenizer.json says.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=self.tokenize_chinese_chars,
            strip_accents=self.strip_accents,
            lowercase=self.do_lower_case,
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        tokenizer.add_special_tokens(list(self.special_tokens.values()))  # no-op for tokens already marked special
        if tokenizer.post_processor is None:
            cls, sep = self.special_tokens["cls_token"], self.special_tokens["sep_token"]
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}",
                pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
            )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.cls_token_id: int = tokenizer.token_to_id(self.special_tokens["cls_token"])
        self.sep_token_id: int = tokenizer.token_to_id(self.special_tokens["sep_token"])
        self.pad_token_id: int = tokenizer.token_to_id(self.special_tokens["pad_token"])
        self.unk_token_id: int = tokenizer.token_to_id(self.special_tokens["unk_token"])
        self.mask_token_id: int = tokenizer.token_to_id(self.special_tokens["mask_token"])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BlipTokenizer:
        """`path`: a folder with tokenizer.json (preferred) or vocab.txt, or the path of either file itself.
        tokenizer_config.json next to it, when present, sets lowercasing, accents, special tokens and cleanup."""
        path = Path(path).expanduser()
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            candidates = [path / TOKENIZER_FILE, path / VOCAB_FILE]
            source = next((c for c in candidates if c.is_file()), None)
            if source is None:
                raise FileNotFoundError(f"no tokenizer in {folder}: looked for {TOKENIZER_FILE} and {VOCAB_FILE}")
        elif path.is_file():
            source = path
        else:
            raise FileNotFoundError(
                f"no tokenizer at {path}: expected a folder holding {TOKENIZER_FILE} or "
                f"{VOCAB_FILE}, or the path of one of those files"
            )
        config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}

        def make(unk: str) -> Tokenizer:
            if source.suffix == ".json":
                return Tokenizer.from_file(str(source))
            return Tokenizer(WordPiece.from_file(str(source), unk_token=unk, max_input_chars_per_word=100))

        return cls._assemble(make, config, str(source))

    @classmethod
    def from_files(cls, files: dict[str, str], source: str = "checkpoint") -> BlipTokenizer:
        """Build from file texts held in memory (a training checkpoint's `tokenizer` entry), never touching disk.

        Only the known names are read (tokenizer.json or vocab.txt, plus tokenizer_config.json); any other name is
        refused, so a checkpoint can never choose where anything is written or read."""
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError(f"{source}: the tokenizer entry must map file names to text")
        unknown = sorted(set(files) - set(TOKENIZER_FILES))
        if unknown:
            shown = ", ".join(repr(n[:80]) for n in unknown[:3])
            raise ValueError(
                f"{source}: unexpected tokenizer file name(s) {shown}; expected only {', '.join(TOKENIZER_FILES)}"
            )
        config: dict = {}
        if CONFIG_FILE in files:
            try:
                config = json.loads(files[CONFIG_FILE])
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: {CONFIG_FILE} is not valid JSON ({e})") from e
            if not isinstance(config, dict):
                raise ValueError(f"{source}: {CONFIG_FILE} does not hold a JSON object")

        def make(unk: str) -> Tokenizer:
            if TOKENIZER_FILE in files:
                return Tokenizer.from_str(files[TOKENIZER_FILE])
            if VOCAB_FILE in files:
                vocab = {token: i for i, token in enumerate(files[VOCAB_FILE].splitlines())}
                return Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
            raise ValueError(f"no {TOKENIZER_FILE} or {VOCAB_FILE}")

        return cls._assemble(make, config, source)

    @classmethod
    def _assemble(cls, make: Callable[[str], Tokenizer], config: dict, source: str) -> BlipTokenizer:
        """`make(unk_token)` builds the WordPiece tokenizer; either step failing is one ValueError naming `source`."""
        try:
            tokenizer = make(_token_text(config.get("unk_token", SPECIAL_ROLES["unk_token"])))
        except Exception as e:  # tokenizers raises bare Exceptions for malformed files
            raise ValueError(f"{source}: cannot read the tokenizer: {e}") from e
        try:
            return cls(tokenizer, config)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    # ---- encoding ----
    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`[CLS] ... [SEP]` ids; with `max_length`, at most that many ids, still ending in [SEP]."""
        return self._truncate(self._tokenizer.encode(text).ids, max_length)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch encode, right-padded with [PAD] to the longest row: (input_ids, attention_mask), both int64 [B, L]."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._truncate(e.ids, max_length) for e in self._tokenizer.encode_batch(list(texts))]
        width = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def _truncate(self, ids: list[int], max_length: int | None) -> list[int]:
        if max_length is None or len(ids) <= max_length:
            return ids
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        return ids[: max_length - 1] + [ids[-1]]

    # ---- decoding ----
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are dropped, special tokens too when `skip_special_tokens`."""
        text = self._tokenizer.decode(self._known_ids(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up(text)

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        rows = [self._known_ids(ids) for ids in batch]
        return [self._clean_up(t) for t in self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)]

    def _known_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [int(i) for i in ids if 0 <= int(i) < self.vocab_size]

    def _clean_up(self, text: str) -> str:
        if self.clean_up_tokenization_spaces:
            for before, after in CLEANUP_RULES:
                text = text.replace(before, after)
        return text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    # ---- saving ----
    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json, loadable by transformers'
        BertTokenizerFast / AutoTokenizer / BlipProcessor with identical encoding and decoding."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / TOKENIZER_FILE))
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("the WordPiece vocabulary ids are not contiguous from 0; cannot write vocab.txt")
        (folder / VOCAB_FILE).write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            **self.special_tokens,
        }
        _write_json(folder / CONFIG_FILE, config)
        _write_json(folder / SPECIAL_TOKENS_FILE, self.special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BlipTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case})"


def _token_text(value: str | dict) -> str:
    """Special tokens are plain strings or, in older configs, AddedToken dicts {"content": ...}."""
    return value["content"] if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
