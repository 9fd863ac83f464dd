"""Tiny but realistic BLIP-2 language-model tokenizer folders, written the way transformers saves them.

- `write_opt_tokenizer`: OPT's GPT-2 byte-level BPE (ids `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 first, as in
  facebook/opt-*; bos = eos = unk = `</s>`, `add_bos_token`), plus `<image>` appended as a special token as in the
  Salesforce/blip2-opt-* repos; tokenizer.json, tokenizer_config.json and vocab.json + merges.txt.
- `write_t5_tokenizer`: T5's SentencePiece-style Unigram (`<pad>`=0, `</s>`=1, `<unk>`=2, then the pieces, then the
  100 `<extra_id_*>` sentinels in reverse, as T5 ships them), `</s>` appended when encoding, plus `<image>`.

Both train on the same small English text with the `tokenizers` package (a few hundred tokens, so tiny models stay
tiny) and wrap the result in transformers' own classes, which write the files. Only tests import this module.
"""

from __future__ import annotations

import json
from pathlib import Path

from oracle import WORDS

SENTENCES = [
    "a dog sitting on the beach",
    "two cats standing near a tree",
    "a woman and a man on the sand by the water",
    "what color is the square? red",
    "how many shapes are there? three",
    "Question: what is in the picture? Answer: a dog",
    "a photo of a red circle and a blue triangle",
    "The big yellow star is at the top left.",
    "There's a green shape in the center, isn't it?",
    "Where is the small black square? bottom right",
]
CORPUS = [" ".join(w for w in WORDS if not w.startswith("##"))] + SENTENCES * 3
IMAGE_TOKEN = "<image>"
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def write_opt_tokenizer(
    folder: Path,
    with_image_token: bool = True,
    vocab_size: int = 360,
    hub_config: bool = False,
    corpus: list[str] | None = None,
) -> dict:
    """Write an OPT-style tokenizer folder; returns the facts a checkpoint builder needs. `corpus` (default: this
    module's small one) is what the BPE is trained on: with a vocabulary large enough, each of its words is one token.

    `hub_config`: tokenizer_config.json and special_tokens_map.json as the Salesforce/blip2-opt-* repos have them
    (saved by transformers 4: `add_bos_token`, `added_tokens_decoder` with `<image>`) instead of transformers 5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, GPT2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=OPT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS if corpus is None else corpus, trainer)
    model = json.loads(backend.to_str())["model"]
    tokenizer = GPT2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]],
        errors="replace",
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_prefix_space=False,
        add_bos_token=True,
    )
    if with_image_token:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tokenizer.save_pretrained(folder)
    backend.model.save(str(folder))  # vocab.json + merges.txt, as the hub repos also ship them
    if hub_config:
        _write_hub_opt_config(folder, tokenizer, with_image_token)
    return {
        "vocab_size": len(tokenizer),  # incl. <image>: the LM embedding needs at least this many rows
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if with_image_token else None,
    }


def write_t5_tokenizer(
    folder: Path, with_image_token: bool = True, vocab_size: int = 300, extra_ids: int = 100
) -> dict:
    """Write a T5-style tokenizer folder; returns the facts a checkpoint builder needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    pieces = [tuple(p) for p in json.loads(backend.to_str())["model"]["vocab"]]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=extra_ids)
    if with_image_token:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tokenizer.save_pretrained(folder)
    return {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if with_image_token else None,
    }


def _write_hub_opt_config(folder: Path, tokenizer, with_image_token: bool) -> None:
    def entry(content: str, normalized: bool) -> dict:
        return dict(content=content, lstrip=False, normalized=normalized, rstrip=False, single_word=False)

    added = {"1": {**entry("<pad>", True), "special": True}, "2": {**entry("</s>", True), "special": True}}
    if with_image_token:
        added[str(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))] = {**entry(IMAGE_TOKEN, False), "special": True}
    config = {
        "add_bos_token": True,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "</s>",
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "processor_class": "Blip2Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "</s>",
    }
    special = {
        role: entry(text, True)
        for role, text in [("bos_token", "</s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"), ("unk_token", "</s>")]
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
