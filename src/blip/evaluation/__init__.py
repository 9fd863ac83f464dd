"""Evaluation: the metrics (coco-caption captioning scores, VQA accuracy, retrieval Recall@K; no Java needed), exported
here, and running a model over an evaluation set (`blip.evaluation.run`: `evaluate`, `write_result`) with its plots
(`blip.evaluation.plots`)."""

from blip.evaluation.caption_metrics import (
    PTB_PUNCTUATION,
    bleu,
    caption_scores,
    cider_d,
    ptb_tokenize,
    ptb_tokenize_batch,
    rouge_l,
)
from blip.evaluation.retrieval_metrics import recall_at_k, retrieval_ranks
from blip.evaluation.vqa_metrics import (
    VQAResult,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_evaluate,
    vqa_question_accuracy,
)

__all__ = [
    "PTB_PUNCTUATION",
    "VQAResult",
    "bleu",
    "caption_scores",
    "cider_d",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "ptb_tokenize",
    "ptb_tokenize_batch",
    "recall_at_k",
    "retrieval_ranks",
    "rouge_l",
    "vqa_accuracy",
    "vqa_evaluate",
    "vqa_question_accuracy",
]
