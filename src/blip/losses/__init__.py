"""Training objectives as modules: ITC (queues, momentum distillation), ITM (hard negatives), LM and VQA answers."""

from blip.losses.itc import ContrastiveLoss, ITCOutput, MomentumEncoder, contrastive_loss
from blip.losses.itm import MatchingLoss, negative_weights, sample_negatives
from blip.losses.lm import AnswerLoss, LanguageModelingLoss, decoder_targets, token_losses

__all__ = [
    "AnswerLoss",
    "ContrastiveLoss",
    "ITCOutput",
    "LanguageModelingLoss",
    "MatchingLoss",
    "MomentumEncoder",
    "contrastive_loss",
    "decoder_targets",
    "negative_weights",
    "sample_negatives",
    "token_losses",
]
