"""transformers' `clean_up_tokenization`, applied to a decoded string when a tokenizer's config turns
`clean_up_tokenization_spaces` on. Torch-free: the tokenizers (`blip.tokenizer`) and the ONNX runner
(`blip.export.onnx_runtime`, which must not import torch) both use it."""

from __future__ import annotations

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


def clean_up_tokenization(text: str) -> str:
    for before, after in CLEANUP_RULES:
        text = text.replace(before, after)
    return text
