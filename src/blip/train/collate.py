"""Collators: dataset items -> the tensors a training task reads (tokenization happens here)."""

from __future__ import annotations

import re
from typing import Any

import torch

from blip.tokenizer import BlipTokenizer

_CAPTION_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(text: str, max_words: int = 50) -> str:
    """The original caption cleanup: lowercase, drop `.!"()*#:;~`, `-` and `/` to spaces, collapse whitespace,
    keep at most `max_words` words."""
    text = _CAPTION_PUNCT.sub(" ", text.lower()).replace("-", " ").replace("/", " ")
    return " ".join(text.split()[:max_words])


def pre_question(text: str, max_words: int = 50) -> str:
    """Whitespace cleanup only: the question reaches the model as inference will pass it (`?` included)."""
    return " ".join(text.split()[:max_words])


class PairCollator:
    """-> `pixel_values [B, 3, S, S]`, `input_ids`/`attention_mask` `[B, T]` of `prompt + caption`, `image_ids [B]`;
    items with written negatives (`"negatives"`) add them as `negative_ids`/`negative_mask` `[K, T']` and
    `negative_owner [K]` (each one's row)."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int = 30, prompt: str = "", max_words: int = 50):
        self.tokenizer, self.max_length, self.prompt, self.max_words = tokenizer, max_length, prompt, max_words

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [self.prompt + pre_caption(item["text"], self.max_words) for item in items]
        ids, mask = self.tokenizer(texts, max_length=self.max_length)
        batch = {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": ids,
            "attention_mask": mask,
            "image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.long),
        }
        written = [(row, text) for row, item in enumerate(items) for text in item.get("negatives", ())]
        if written:
            owners = [row for row, _ in written]
            negatives = [pre_caption(text, self.max_words) for _, text in written]
            batch["negative_ids"], batch["negative_mask"] = self.tokenizer(negatives, max_length=self.max_length)
            batch["negative_owner"] = torch.tensor(owners, dtype=torch.long)
        return batch


class QuestionCollator:
    """-> `pixel_values`, question `input_ids`/`attention_mask` `[B, Lq]`, and every distinct answer of every
    question: `answer_ids`/`answer_mask` `[A, La]`, `answer_weights [A]`, `answer_owner [A]` (its question's row)."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int = 35, max_answer_length: int = 10):
        self.tokenizer, self.max_length, self.max_answer_length = tokenizer, max_length, max_answer_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenizer([pre_question(item["question"]) for item in items], max_length=self.max_length)
        answers, weights, owner = [], [], []
        for row, item in enumerate(items):
            answers += item["answers"]
            weights += item["weights"]
            owner += [row] * len(item["answers"])
        a_ids, a_mask = self.tokenizer(answers, max_length=self.max_answer_length)
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": ids,
            "attention_mask": mask,
            "answer_ids": a_ids,
            "answer_mask": a_mask,
            "answer_weights": torch.tensor(weights, dtype=torch.float32),
            "answer_owner": torch.tensor(owner, dtype=torch.long),
        }


def prompt_length(tokenizer: BlipTokenizer, prompt: str) -> int:
    """Decoder positions taken by `[DEC]` + the prompt's word pieces (the prompt's `[CLS] ... ` without `[SEP]`)."""
    return len(tokenizer.encode(prompt)) - 1 if prompt else 0
