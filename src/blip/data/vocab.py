"""The shapes world's tokenizer: a closed WordPiece vocabulary, and the text config that goes with it.

The vocabulary is the BERT specials, every word the shapes generator can write (`blip.data.shapes.vocabulary`),
the words of the usual captioning prompts ("a picture of", "a photo of") and a few punctuation marks. `[DEC]` and
`[ENC]` come right after it (ids `len(vocab)` and `len(vocab) + 1`), as they follow bert-base-uncased's 30522 words.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordPiece

from blip.config import BlipConfig, TextConfig
from blip.tokenizer import BlipTokenizer

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
EXTRA_TOKENS: tuple[str, ...] = ("picture", "photo", "of", "?", ".", ",", ":")


def shapes_vocab_tokens() -> list[str]:
    """Vocabulary in id order: specials (PAD=0, UNK=1, CLS=2, SEP=3, MASK=4), words, extras."""
    from blip.data.shapes import vocabulary

    words = sorted({w for phrase in vocabulary() for w in phrase.lower().split()})
    return list(dict.fromkeys([*SPECIAL_TOKENS, *words, *EXTRA_TOKENS]))


def write_shapes_vocab(folder: str | Path) -> Path:
    """Write `vocab.txt` into `folder` and return its path."""
    path = Path(folder) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(shapes_vocab_tokens()) + "\n", encoding="utf-8")
    return path


def shapes_tokenizer() -> BlipTokenizer:
    """The shapes tokenizer, built in memory."""
    vocab = {token: i for i, token in enumerate(shapes_vocab_tokens())}
    return BlipTokenizer(Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100)))


def text_config_for(tokenizer: BlipTokenizer, base: TextConfig) -> TextConfig:
    """`base` resized to the tokenizer: vocabulary + [DEC] + [ENC], its pad / [SEP] ids, [DEC] = first id after it."""
    return dataclasses.replace(
        base,
        vocab_size=tokenizer.vocab_size + 2,
        bos_token_id=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )


def config_for(tokenizer: BlipTokenizer, base: BlipConfig) -> BlipConfig:
    return base.replace(text=text_config_for(tokenizer, base.text))
