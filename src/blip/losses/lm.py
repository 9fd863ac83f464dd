"""Language-modelling losses of the image-grounded decoder: captions (LM) and VQA answers.

Decoder inputs are the tokenized text with position 0 replaced by `[DEC]` (the config's `text.bos_token_id`);
targets are the same ids with pads and prompt tokens set to -100, predicted one position ahead; cross-entropy with
label smoothing 0.1 (docs/training.md, objectives).

- `LanguageModelingLoss`: the mean over target tokens. With several ranks the mean is over the tokens of the whole
  global batch (token counts are summed over ranks), so splitting a batch over processes does not reweight it.
- `AnswerLoss` (VQA): per answer the *summed* smoothed token cross-entropy, weighted by the answer's share of the
  human votes, summed and divided by the number of questions. Answers are `[DEC] tokens [SEP]`, exactly what rank-mode
  inference scores and generation produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.distributed import all_reduce_sum, get_world_size

IGNORE = -100


def decoder_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, *, bos_id: int, prompt_length: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input ids with `[DEC]` at position 0, targets with pads and the first `prompt_length` positions
    -> -100). `prompt_length` counts `[DEC]` and the prompt's word pieces."""
    ids = input_ids.clone()
    ids[:, 0] = bos_id
    targets = ids.masked_fill(attention_mask == 0, IGNORE)
    if prompt_length > 0:
        targets[:, :prompt_length] = IGNORE
    return ids, targets


def token_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-position smoothed cross-entropy `[B, T-1]` of `logits[:, :-1]` against `targets[:, 1:]` (0 where
    ignored)."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        targets[:, 1:],
        ignore_index=IGNORE,
        reduction="none",
        label_smoothing=label_smoothing,
    )


class LanguageModelingLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.1, global_mean: bool = True):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.global_mean = global_mean

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`logits` `[B, T, V]` (teacher forced), `targets` `[B, T]` from `decoder_targets`."""
        losses = token_losses(logits, targets, self.label_smoothing)
        count = (targets[:, 1:] != IGNORE).sum()
        if self.global_mean and get_world_size() > 1:
            # Each rank's share of the global mean; DDP's gradient average then gives the global token mean.
            total = all_reduce_sum(count.float()).clamp(min=1)
            return losses.sum() * get_world_size() / total
        return losses.sum() / count.clamp(min=1)


class AnswerLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_questions: int
    ) -> torch.Tensor:
        """`logits` `[A, T, V]` for A answers (several per question), `targets` `[A, T]`, `weights` `[A]`."""
        per_answer = token_losses(logits, targets, self.label_smoothing).sum(1)
        return (weights.float() * per_answer).sum() / max(num_questions, 1)
