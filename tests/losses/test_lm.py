"""LM and VQA answer losses: decoder inputs/targets, label smoothing 0.1 by hand, token means, answer weighting."""

from __future__ import annotations

import math

import pytest
import torch

from blip.losses.lm import IGNORE, AnswerLoss, LanguageModelingLoss, decoder_targets, token_losses


def test_decoder_targets_put_dec_first_and_ignore_pads_and_prompt():
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 10, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    inputs, targets = decoder_targets(ids, mask, bos_id=99, prompt_length=2)
    assert inputs[:, 0].tolist() == [99, 99] and torch.equal(inputs[:, 1:], ids[:, 1:])
    assert targets.tolist() == [[IGNORE, IGNORE, 11, 12, 3, IGNORE], [IGNORE, IGNORE, 3, IGNORE, IGNORE, IGNORE]]
    assert ids[0, 0] == 2  # the input is not modified


def _smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    log_z = math.log(sum(math.exp(x) for x in logits))
    nll = log_z - logits[target]
    uniform = sum(log_z - x for x in logits) / len(logits)
    return (1 - eps) * nll + eps * uniform


def test_label_smoothing_hand_computed():
    # One sequence of 3 positions over a 3-word vocabulary; targets are read one position ahead.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, -1.0], [5.0, 5.0, 5.0]]])
    targets = torch.tensor([[IGNORE, 0, 2]])
    losses = token_losses(logits, targets, 0.1)
    assert losses[0].tolist() == pytest.approx([_smoothed_ce([2, 0, 0], 0, 0.1), _smoothed_ce([0, 1, -1], 2, 0.1)])
    # log(e^2 + 2) - 2 = 0.2395; smoothing adds 0.1 * (mean NLL - NLL)
    assert losses[0, 0].item() == pytest.approx(0.9 * 0.23954 + 0.1 * (math.log(math.exp(2) + 2) - 2 / 3), abs=1e-4)


def test_lm_loss_is_the_mean_over_target_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[IGNORE, 1, 2, 3, IGNORE], [IGNORE, 4, IGNORE, IGNORE, IGNORE]])
    per_token = token_losses(logits, targets, 0.1)
    loss = LanguageModelingLoss(0.1)(logits, targets)
    assert loss.item() == pytest.approx(per_token.sum().item() / 4, rel=1e-6)
    assert per_token[1, 1:].eq(0).all()  # ignored positions contribute nothing


def test_answer_loss_weights_summed_answer_losses_per_question():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)  # 3 answers (2 for question 0, 1 for question 1)
    targets = torch.tensor([[IGNORE, 1, 3, IGNORE], [IGNORE, 2, 3, IGNORE], [IGNORE, 5, 3, 3]])
    weights = torch.tensor([0.7, 0.3, 1.0])
    per_token = token_losses(logits, targets, 0.1)
    expected = (0.7 * per_token[0].sum() + 0.3 * per_token[1].sum() + 1.0 * per_token[2].sum()) / 2
    loss = AnswerLoss(0.1)(logits, targets, weights, num_questions=2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
