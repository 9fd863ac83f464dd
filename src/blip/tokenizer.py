"""Text tokenizers, built on the `tokenizers` package (no transformers or sentencepiece at run time).

- `BlipTokenizer`: BERT uncased WordPiece, the one every BLIP checkpoint (and BLIP-2's Q-Former) uses. Matches
  transformers' `BertTokenizerFast` loaded from the same folder: encoding (normaliser, pre-tokeniser, WordPiece,
  `[CLS] ... [SEP]` template, special tokens written literally in the text) and decoding (the WordPiece decoder with its
  own per-token cleanup, unknown ids dropped, then the whole-string `clean_up_tokenization_spaces` rules only when the
  folder's tokenizer_config.json turns them on; transformers 5 defaults them to off).
- `LmTokenizer`: the language-model tokenizers BLIP-2 checkpoints ship: OPT's GPT-2 byte-level BPE and T5's
  SentencePiece Unigram, equal to what transformers 5's `AutoTokenizer` builds from the same folder.
- `load_text_tokenizer(folder)`: whichever of the two the folder holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram, WordPiece

from blip.text_cleanup import CLEANUP_RULES, clean_up_tokenization  # noqa: F401 (CLEANUP_RULES: a public name here too)

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


class _Decoding:
    """Decoding shared by both tokenizers (over `self._tokenizer`, a `tokenizers.Tokenizer`): ids outside the
    vocabulary dropped, special tokens skipped on request, then transformers' whole-string cleanup where it applies."""

    _tokenizer: Tokenizer
    vocab_size: int

    def _applies_cleanup(self) -> bool:
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are dropped, special tokens too when `skip_special_tokens`."""
        return self._cleaned(self._tokenizer.decode(self._known_ids(ids), skip_special_tokens=skip_special_tokens))

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        rows = [self._known_ids(ids) for ids in batch]
        return [self._cleaned(t) for t in self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)]

    def _known_ids(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [int(i) for i in ids if 0 <= int(i) < self.vocab_size]

    def _cleaned(self, text: str) -> str:
        return clean_up_tokenization(text) if self._applies_cleanup() else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class BlipTokenizer(_Decoding):
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
        _check_files(files, TOKENIZER_FILES, source)
        config = _parse_json(files[CONFIG_FILE], CONFIG_FILE, source) if CONFIG_FILE in files else {}

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`[CLS] ... [SEP]` ids (not truncated) and each one's `(start, end)` character span in `text` ((0, 0) for
        [CLS] and [SEP])."""
        encoding = self._tokenizer.encode(text)
        return list(encoding.ids), [(int(a), int(b)) for a, b in encoding.offsets]

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

    def _applies_cleanup(self) -> bool:
        return self.clean_up_tokenization_spaces

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


# ---- language-model tokenizers (BLIP-2: OPT and Flan-T5) ----

VOCAB_JSON_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
ADDED_TOKENS_FILE = "added_tokens.json"
SENTENCEPIECE_FILE = "spiece.model"
LM_TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE, VOCAB_JSON_FILE, MERGES_FILE)
LM_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json's "tokenizer_class" (without "Fast") -> family; the defaults are the classes' own.
LM_FAMILIES = {"GPT2Tokenizer": "bpe", "T5Tokenizer": "t5"}
# classes that use tokenizer.json's own pipeline (transformers 5's TokenizersBackend; PreTrainedTokenizerFast in 4)
FILE_PIPELINE_CLASSES = ("TokenizersBackend", "PreTrainedTokenizer")
LM_DEFAULTS = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "t5": {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
}
METASPACE = "▁"


class LmTokenizer(_Decoding):
    """A BLIP-2 language model's tokenizer: OPT's GPT-2 byte-level BPE ("bpe") or T5's Unigram ("t5").

    Built the way transformers 5 builds `GPT2Tokenizer` / `T5Tokenizer` from a folder, so ids and texts are the same:
    the model (BPE vocab + merges, or Unigram pieces + scores) comes from tokenizer.json (or vocab.json + merges.txt
    for BPE), while the rest of the pipeline is the class's own: BPE has no normaliser, a ByteLevel pre-tokeniser
    (`add_prefix_space` from the config) and decoder, and tokenizer.json's post-processor (OPT's prepends `</s>` as
    BOS; without tokenizer.json, `add_bos_token` / `add_eos_token` from the config build it); T5 keeps only the
    SentencePiece `Precompiled` normaliser of tokenizer.json, splits on whitespace then Metaspace ("▁", always
    prepended) and always appends `</s>`. Added tokens (e.g. `<image>`) and special tokens come from
    tokenizer_config.json's `added_tokens_decoder`, or else special_tokens_map.json, added_tokens.json and
    tokenizer.json's `added_tokens`, in transformers' order, so new tokens get the same ids. `pipeline="file"` keeps
    tokenizer.json's own pipeline instead (transformers' TokenizersBackend; see `from_pretrained`).

    Decoding drops ids outside the vocabulary and, with `skip_special_tokens`, the special tokens; the
    `clean_up_tokenization_spaces` rules apply only when the config turns them on, and never to BPE (transformers 5
    skips them for BPE unless `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` is set).
    """

    def __init__(
        self, tokenizer: Tokenizer, family: str, config: dict, special_tokens: dict[str, str], pipeline: str = "class"
    ):
        self._tokenizer = tokenizer
        self.family = family
        self.pipeline = pipeline
        self.config = config
        self.special_tokens = special_tokens  # role ("bos_token", ..., "image_token") -> text
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._clean_up = self.clean_up_tokenization_spaces and (
            family != "bpe"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        self.padding_side: str = config.get("padding_side", "right")
        self.truncation_side: str = config.get("truncation_side", "right")
        for name, side in (("padding_side", self.padding_side), ("truncation_side", self.truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{CONFIG_FILE}: {name} must be 'left' or 'right', got {side!r}")
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)  # = len(transformers' tokenizer)
        self.bos_token_id = self._role_id("bos_token")
        self.eos_token_id = self._role_id("eos_token")
        self.pad_token_id = self._role_id("pad_token")
        self.unk_token_id = self._role_id("unk_token")
        image_token = special_tokens.get("image_token", "<image>")
        self.image_token_id: int | None = tokenizer.token_to_id(image_token)  # Blip2Processor's `<image>`
        self._num_special = tokenizer.num_special_tokens_to_add(False)

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self._tokenizer.token_to_id(token)

    # ---- loading ----
    @classmethod
    def from_pretrained(cls, folder: str | Path, pipeline: str = "class") -> LmTokenizer:
        """`folder`: tokenizer.json (or, for BPE, vocab.json + merges.txt) plus the optional tokenizer_config.json,
        special_tokens_map.json and added_tokens.json.

        `pipeline`: "class" (default) builds the pipeline as the folder's tokenizer_class does, which is what
        `AutoTokenizer.from_pretrained(folder)` does for a local folder; "file" keeps tokenizer.json's own pipeline
        as transformers' TokenizersBackend does, which is what transformers 5 uses when the Salesforce/blip2-opt-*
        and Salesforce/blip2-flan-t5-* repos are loaded by hub name. A folder whose tokenizer_class is
        TokenizersBackend or PreTrainedTokenizerFast (what `save_pretrained` writes for "file") always uses "file"."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"no tokenizer at {folder}: expected a folder")
        files = {}
        for name in LM_TOKENIZER_FILES:
            if (folder / name).is_file():
                try:
                    files[name] = (folder / name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise ValueError(f"cannot read {folder / name}: {e}") from e
        if TOKENIZER_FILE not in files and (folder / SENTENCEPIECE_FILE).is_file() and VOCAB_JSON_FILE not in files:
            raise ValueError(
                f"{folder}: {SENTENCEPIECE_FILE} without {TOKENIZER_FILE} is not supported (no sentencepiece at run "
                f"time); save the tokenizer with transformers to get {TOKENIZER_FILE}"
            )
        return cls.from_files(files, source=str(folder), pipeline=pipeline)

    @classmethod
    def from_files(cls, files: dict[str, str], source: str = "checkpoint", pipeline: str = "class") -> LmTokenizer:
        """Build from file texts held in memory (e.g. a training checkpoint's `tokenizer` entry); only the names in
        LM_TOKENIZER_FILES are accepted."""
        _check_files(files, LM_TOKENIZER_FILES, source)
        parsed = {name: _parse_json(text, name, source) for name, text in files.items() if name.endswith(".json")}
        config = parsed.get(CONFIG_FILE, {})
        tokenizer_json = parsed.get(TOKENIZER_FILE)
        if pipeline not in ("class", "file"):
            raise ValueError(f"pipeline must be 'class' or 'file', got {pipeline!r}")
        if str(config.get("tokenizer_class") or "").removesuffix("Fast") in FILE_PIPELINE_CLASSES:
            pipeline = "file"
        family = _lm_family(config, tokenizer_json, files, source, pipeline)
        try:
            tokenizer, special = _build_lm(family, config, parsed, files, pipeline)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        except Exception as e:  # tokenizers raises bare Exceptions for malformed files
            raise ValueError(f"{source}: cannot read the tokenizer: {e}") from e
        return cls(tokenizer, family, config, special, pipeline)

    # ---- encoding ----
    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Ids of `text` (OPT: `</s>` BOS first; T5: `</s>` last); with `max_length`, the text is cut (on the config's
        truncation side) so that the ids, special tokens included, are at most that many."""
        return self._encode([text], add_special_tokens, max_length)[0]

    def _encode(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
        if max_length is None:
            return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        room = max_length - (self._num_special if add_special_tokens else 0)
        if room < 0:
            raise ValueError(f"max_length must be at least {max_length - room} (the special tokens), got {max_length}")
        rows = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(room, direction=self.truncation_side)
            if add_special_tokens:
                encoding = self._tokenizer.post_process(encoding)
            rows.append(encoding.ids)
        return rows

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        *,
        add_special_tokens: bool = True,
        num_image_tokens: int = 0,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch encode, padded with the pad token to the longest row: (input_ids, attention_mask), int64 [B, L].

        Padding goes on `padding_side` (default: the config's, else "right"). `num_image_tokens` > 0 does what
        transformers' Blip2Processor does with images: the text is encoded (and truncated to max_length minus the
        image tokens) and padded first, then that many `<image>` ids (mask 1) are put in front of every row."""
        if isinstance(texts, str):
            texts = [texts]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if num_image_tokens and self.image_token_id is None:
            raise ValueError("this tokenizer has no <image> token, so num_image_tokens cannot be used")
        if max_length is not None:
            max_length -= num_image_tokens
        rows = self._encode(list(texts), add_special_tokens, max_length)
        width = max((len(r) for r in rows), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), num_image_tokens + width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), num_image_tokens + width), dtype=torch.long)
        input_ids[:, :num_image_tokens] = self.image_token_id if num_image_tokens else 0
        attention_mask[:, :num_image_tokens] = 1
        for i, row in enumerate(rows):
            start = num_image_tokens + (width - len(row) if side == "left" else 0)
            input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, start : start + len(row)] = 1
        return input_ids, attention_mask

    def _applies_cleanup(self) -> bool:
        return self._clean_up

    # ---- saving ----
    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (BPE: also vocab.json and
        merges.txt), which transformers' AutoTokenizer and this class read back with the same ids and texts."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / TOKENIZER_FILE))
        if self.family == "bpe":
            self._tokenizer.model.save(str(folder))  # vocab.json + merges.txt
        kept = ("add_prefix_space", "errors", "extra_ids", "model_max_length", "padding_side", "truncation_side")
        config = {key: self.config[key] for key in kept if key in self.config}
        extras = self.config.get("extra_special_tokens", self.config.get("additional_special_tokens"))
        if isinstance(extras, list):
            config["extra_special_tokens"] = [_token_text(t) for t in extras]
        config.update(
            tokenizer_class="PreTrainedTokenizerFast"
            if self.pipeline == "file"
            else {"bpe": "GPT2Tokenizer", "t5": "T5Tokenizer"}[self.family],
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            **self.special_tokens,
        )
        if self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
        _write_json(folder / CONFIG_FILE, config)
        _write_json(folder / SPECIAL_TOKENS_FILE, {k: v for k, v in self.special_tokens.items() if k in LM_ROLES})

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"LmTokenizer(family={self.family!r}, vocab_size={self.vocab_size})"


def _check_files(files: dict[str, str], allowed: Sequence[str], source: str) -> None:
    """A checkpoint's in-memory tokenizer entry: file names (only those in `allowed`) mapped to their text."""
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{source}: the tokenizer entry must map file names to text")
    unknown = sorted(set(files) - set(allowed))
    if unknown:
        shown = ", ".join(repr(n[:80]) for n in unknown[:3])
        raise ValueError(f"{source}: unexpected tokenizer file name(s) {shown}; expected only {', '.join(allowed)}")


def _parse_json(text: str, name: str, source: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: {name} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {name} does not hold a JSON object")
    return data


def _lm_family(config: dict, tokenizer_json: dict | None, files: dict[str, str], source: str, pipeline: str) -> str:
    """ "bpe" or "t5", from tokenizer_config.json's tokenizer_class, else from the model in tokenizer.json."""
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if pipeline == "file":
        if tokenizer_json is None:
            raise ValueError(f"{source}: no {TOKENIZER_FILE} (needed for its own pipeline)")
        name = ""
    if name:
        if name not in LM_FAMILIES:
            raise ValueError(
                f"{source}: unsupported tokenizer_class {name!r} (expected one of {', '.join(LM_FAMILIES)})"
            )
        family = LM_FAMILIES[name]
    elif tokenizer_json is not None:
        kind = (tokenizer_json.get("model") or {}).get("type")
        family = {"BPE": "bpe", "Unigram": "t5"}.get(kind, "")
        if not family:
            raise ValueError(f"{source}: {TOKENIZER_FILE} holds a {kind} model; expected BPE (OPT) or Unigram (T5)")
    else:
        family = "bpe"
    if tokenizer_json is None and not (family == "bpe" and VOCAB_JSON_FILE in files and MERGES_FILE in files):
        wanted = TOKENIZER_FILE if family == "t5" else f"{TOKENIZER_FILE} or {VOCAB_JSON_FILE} + {MERGES_FILE}"
        raise ValueError(f"{source}: no {wanted}")
    return family


def _added_token(value: str | dict | AddedToken, **defaults) -> AddedToken:
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, dict):
        fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        return AddedToken(value["content"], **{**fields, **defaults})
    return AddedToken(str(value), **defaults)


def _build_lm(
    family: str, config: dict, parsed: dict[str, dict], files: dict[str, str], pipeline: str
) -> tuple[Tokenizer, dict]:
    """The backend tokenizer and the special tokens (role -> text), the way transformers 5's `from_pretrained`
    assembles them (tokenization_utils_base._from_pretrained + TokenizersBackend / GPT2Tokenizer / T5Tokenizer)."""
    tokenizer_json = parsed.get(TOKENIZER_FILE)
    # the classes' default special tokens; TokenizersBackend has none when it reads tokenizer.json
    named: dict[str, str | dict | AddedToken] = dict(LM_DEFAULTS[family]) if pipeline == "class" else {}
    named.update({role: config[role] for role in LM_ROLES if config.get(role) is not None})
    # model-specific named tokens, e.g. "image_token": "<image>"
    named.update({k: v for k, v in config.items() if k.endswith("_token") and k not in LM_ROLES and isinstance(v, str)})
    extras = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extras, dict):
        named.update(extras)
        extras = None

    added: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        added = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
    else:  # legacy files, in transformers' order
        for key, value in parsed.get(SPECIAL_TOKENS_FILE, {}).items():
            if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                extras = list(extras or []) + [t for t in value if t not in (extras or [])]
            elif key.endswith("_token") and value is not None:
                named[key] = _added_token(value, special=True) if isinstance(value, dict) else value
        if ADDED_TOKENS_FILE in parsed:
            specials = {_token_text(v) for v in named.values() if v is not None}
            specials |= {_token_text(t) for t in extras or []}
            for text, i in parsed[ADDED_TOKENS_FILE].items():
                special = text in specials
                added[int(i)] = AddedToken(text, lstrip=False, rstrip=False, normalized=not special, special=special)
        for entry in (tokenizer_json or {}).get("added_tokens", []):
            added[int(entry["id"])] = _added_token(entry)
    by_text = {t.content: t for t in added.values()}
    named = {role: by_text.get(_token_text(v), v) for role, v in named.items() if v is not None}
    if extras is None and family == "t5" and pipeline == "class":
        extras = [f"<extra_id_{i}>" for i in range(int(config.get("extra_ids", 100)))]

    if pipeline == "file":
        tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
        existing = set(tokenizer.get_added_tokens_decoder().values())
    else:
        tokenizer = _lm_backend(family, config, tokenizer_json, files)
        existing = set()

    # TokenizersBackend.__init__: the saved added tokens by id, then any named or extra special token not among them.
    to_add = [added[i] for i in sorted(added)]
    seen = {t.content for t in to_add} | {t.content for t in existing}
    to_add = [t for t in to_add if repr(t) not in {repr(e) for e in existing}]
    for value in [*named.values(), *(extras or [])]:
        text = _token_text(value)
        if text not in seen:
            seen.add(text)
            token = _added_token(value, special=True) if not isinstance(value, AddedToken) else value
            if not token.special and text in {_token_text(v) for v in named.values()}:
                token = AddedToken(text, **{**_added_token_fields(token), "special": True})
            to_add.append(token)
    if to_add:
        tokenizer.add_tokens(to_add)

    special = {role: _token_text(v) for role, v in named.items()}
    if family == "t5" and pipeline == "class":  # T5Tokenizer: always `$A </s>`, whatever tokenizer.json says
        eos_id = tokenizer.token_to_id(special["eos_token"])
        if eos_id is None:
            eos_id = tokenizer.token_to_id(special["unk_token"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)]
        )
    elif tokenizer.post_processor is None:
        # with tokenizer.json, transformers ignores the config's add_bos_token / add_eos_token
        add_bos = tokenizer_json is None and bool(config.get("add_bos_token", False)) and "bos_token" in special
        add_eos = tokenizer_json is None and bool(config.get("add_eos_token", False)) and "eos_token" in special
        bos, eos = special.get("bos_token"), special.get("eos_token")
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        tokens = ([(bos, tokenizer.token_to_id(bos))] if add_bos else []) + (
            [(eos, tokenizer.token_to_id(eos))] if add_eos else []
        )
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, special


def _added_token_fields(token: AddedToken) -> dict:
    return {k: getattr(token, k) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")}


def _lm_backend(family: str, config: dict, tokenizer_json: dict | None, files: dict[str, str]) -> Tokenizer:
    """The model from the files, with the normaliser, pre-tokeniser and decoder transformers' class sets."""
    model_json = (tokenizer_json or {}).get("model") or {}
    if family == "t5":
        pieces = [(str(p), float(s)) for p, s in model_json.get("vocab") or []]
        if not pieces:
            raise ValueError(f"{TOKENIZER_FILE} has no Unigram pieces")
        tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
        charsmap = _precompiled_charsmap(tokenizer_json.get("normalizer"))
        if charsmap is not None:
            tokenizer.normalizer = normalizers.Precompiled(charsmap)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
            ]
        )
        tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
        return tokenizer

    if tokenizer_json is not None:
        vocab = model_json.get("vocab")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json.get("merges") or []]
    else:
        vocab = json.loads(files[VOCAB_JSON_FILE])
        lines = files[MERGES_FILE].splitlines()
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [tuple(line.split(" ")) for line in lines if line.strip()]
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("the BPE vocabulary is missing or not a token -> id mapping")
    if any(len(m) != 2 for m in merges):
        raise ValueError("a BPE merge is not a pair of tokens")
    tokenizer = Tokenizer(
        BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()
    if tokenizer_json is not None and tokenizer_json.get("post_processor") is not None:
        # tokenizer.json's post-processor is kept (OPT's: `</s>` prepended as BOS)
        stub = dict(tokenizer_json, added_tokens=[], model={**model_json, "vocab": {}, "merges": []})
        tokenizer.post_processor = Tokenizer.from_str(json.dumps(stub)).post_processor
    return tokenizer


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """The SentencePiece `Precompiled` charsmap in tokenizer.json's normaliser (alone or inside a Sequence)."""
    import base64

    if not normalizer:
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def load_text_tokenizer(folder: str | Path, pipeline: str = "class") -> BlipTokenizer | LmTokenizer:
    """The tokenizer a checkpoint folder ships: BlipTokenizer for BERT WordPiece (tokenizer_class BertTokenizer,
    vocab.txt or a WordPiece tokenizer.json), LmTokenizer for OPT / T5 (GPT2Tokenizer / T5Tokenizer; `pipeline`: see
    `LmTokenizer.from_pretrained`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer at {folder}: expected a folder")
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if name == "BertTokenizer":
        return BlipTokenizer.from_pretrained(folder)
    if name and name not in FILE_PIPELINE_CLASSES:
        return LmTokenizer.from_pretrained(folder, pipeline)
    if (folder / TOKENIZER_FILE).is_file():
        model = (_read_json(folder / TOKENIZER_FILE).get("model") or {}).get("type")
        if model == "WordPiece":
            return BlipTokenizer.from_pretrained(folder)
        return LmTokenizer.from_pretrained(folder, pipeline)
    if (folder / VOCAB_FILE).is_file():
        return BlipTokenizer.from_pretrained(folder)
    if (folder / VOCAB_JSON_FILE).is_file() and (folder / MERGES_FILE).is_file():
        return LmTokenizer.from_pretrained(folder, pipeline)
    raise FileNotFoundError(
        f"no tokenizer in {folder}: looked for {TOKENIZER_FILE}, {VOCAB_FILE}, {VOCAB_JSON_FILE} + {MERGES_FILE}"
    )


def _token_text(value: str | dict | AddedToken) -> str:
    """Special tokens are plain strings or, in older configs, AddedToken dicts {"content": ...}."""
    if isinstance(value, AddedToken):
        return value.content
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
