"""Training objectives: each task sums its losses into `{"<name>_loss": ..., "loss": ...}`; the loop stays generic.

A training task (`TrainTask`, not to be confused with the inference tasks of `blip.tasks`) is an `nn.Module` holding
the `BlipModel` (`task.model`) plus the objectives' own state (momentum encoders, queues, temperature), so one
`state_dict` resumes everything. The loop calls `before_step(step)` once per optimizer step (momentum update,
distillation ramp) and `task(batch)` (= `training_forward`) per micro-batch.

Start tokens: the unimodal encoder (ITC) reads `[CLS]`. The image-grounded encoder (ITM, VQA questions) reads
`[CLS]` by default (`itm_token="cls"`), because that is what the transformers-compatible inference API feeds it
(`Blip.match`, `Blip.answer`); the original code trained it with `[ENC]` (`itm_token="enc"`), and then the model
must also be queried with `[ENC]`. The decoder reads `[DEC]`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from blip.losses.itc import ContrastiveLoss
from blip.losses.itm import PRETRAIN_EPS, MatchingLoss
from blip.losses.lm import AnswerLoss, LanguageModelingLoss, decoder_targets
from blip.models.blip import BlipModel

Batch = dict[str, torch.Tensor]


class TrainTask(nn.Module):
    """Base class: `forward(batch)` runs `training_forward(batch)` (so DDP wraps the task)."""

    model: BlipModel

    def before_step(self, step: int) -> None:
        """Called once per optimizer step, before its first forward."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.training_forward(batch)

    def training_forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _first_token(ids: torch.Tensor, token_id: int | None) -> torch.Tensor:
    if token_id is None:
        return ids
    ids = ids.clone()
    ids[:, 0] = token_id
    return ids


def _ramp(alpha: float, step: int, ramp_steps: int) -> float:
    return alpha * min(1.0, step / ramp_steps) if ramp_steps > 0 else alpha


class _ContrastiveTask(TrainTask):
    """What pretraining and retrieval share: ITC with a momentum encoder, queues and a distillation ramp, and ITM on
    hard negatives mined from the ITC similarities (plus the data's written negatives, `negative_ids`, when the batch
    has them). With `use_image_ids` (retrieval) every pair of one image is a positive."""

    use_image_ids: ClassVar[bool] = False

    def __init__(
        self,
        model: BlipModel,
        *,
        queue_size: int = 57600,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_ramp_steps: int = 0,
        temp: float = 0.07,
        itm_token_id: int | None = None,
        negatives_all_ranks: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.model = model
        self.alpha, self.alpha_ramp_steps = alpha, alpha_ramp_steps
        self.itm_token_id = itm_token_id
        self.itc = ContrastiveLoss(
            model,
            embed_dim=model.config.embed_dim,
            queue_size=queue_size,
            momentum=momentum,
            temp=temp,
            alpha=alpha,
            use_idx=self.use_image_ids,
        )
        # retrieval mines among the online similarities only (eps 0), pretraining smooths them (the paper's code)
        eps = 0.0 if self.use_image_ids else PRETRAIN_EPS
        self.itm = MatchingLoss(use_momentum=not self.use_image_ids, eps=eps, all_ranks=negatives_all_ranks, seed=seed)

    def before_step(self, step: int) -> None:
        self.itc.alpha = _ramp(self.alpha, step, self.alpha_ramp_steps)
        self.itc.momentum_update(self.model)

    def contrastive_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings `[B, N, Dv]`, ITC loss, ITM loss) of a batch."""
        model = self.model
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        image_embeds = model.encode_image(pixels)  # (B, N, Dv)
        image_feat = model.image_features(image_embeds)
        text_feat = model.text_features(model.encode_text(ids, mask, first_only=True))
        idx = batch["image_ids"] if self.itc.use_idx else None
        itc = self.itc(image_feat, text_feat, pixels, ids, mask, idx=idx)
        pad = model.config.text.pad_token_id
        written = None  # texts the data says are false for their image: more ITM negatives
        if "negative_ids" in batch:
            ids_w = _first_token(batch["negative_ids"], self.itm_token_id)
            written = (ids_w, batch["negative_mask"], batch["negative_owner"])
        itm_loss = self.itm(model, image_embeds, _first_token(ids, self.itm_token_id), mask, itc, pad, written)
        return image_embeds, itc.loss, itm_loss


class PretrainTask(_ContrastiveTask):
    """ITC + ITM + LM, weights 1:1:1; one ViT pass and three text passes per pair.

    batch: `pixel_values` `[B, 3, S, S]`, `input_ids`/`attention_mask` `[B, T]` (`[CLS] text [SEP]`)."""

    def __init__(self, model: BlipModel, *, label_smoothing: float = 0.1, **contrastive: Any):
        super().__init__(model, **contrastive)
        self.lm = LanguageModelingLoss(label_smoothing)

    def training_forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        image_embeds, itc_loss, itm_loss = self.contrastive_losses(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        decoder_ids, targets = decoder_targets(ids, mask, bos_id=self.model.config.text.bos_token_id)
        lm_loss = self.lm(self.model.lm_logits(decoder_ids, mask, image_embeds), targets)
        return {"itc_loss": itc_loss, "itm_loss": itm_loss, "lm_loss": lm_loss, "loss": itc_loss + itm_loss + lm_loss}


class CaptionTask(TrainTask):
    """LM fine-tuning of a captioner; `prompt_length` tokens ([DEC] + prompt) are not predicted.

    batch: `pixel_values`, `input_ids`/`attention_mask` of `prompt + caption`."""

    def __init__(self, model: BlipModel, *, prompt_length: int = 0, label_smoothing: float = 0.1):
        super().__init__()
        self.model = model
        self.prompt_length = prompt_length
        self.lm = LanguageModelingLoss(label_smoothing)

    def training_forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        model = self.model
        image_embeds = model.encode_image(batch["pixel_values"])
        ids, targets = decoder_targets(
            batch["input_ids"],
            batch["attention_mask"],
            bos_id=model.config.text.bos_token_id,
            prompt_length=self.prompt_length,
        )
        loss = self.lm(model.lm_logits(ids, batch["attention_mask"], image_embeds), targets)
        return {"lm_loss": loss, "loss": loss}


class VqaTask(TrainTask):
    """Answer generation loss: the question is encoded against its image, then the decoder reads the question states
    (one copy per question, shared by all of its answers through a row index) and is teacher-forced on each answer.

    batch: `pixel_values` `[B, ...]`, `input_ids`/`attention_mask` (questions) `[B, Lq]`, `answer_ids`/`answer_mask`
    `[A, La]` (`[CLS] answer [SEP]`), `answer_weights` `[A]`, `answer_owner` `[A]` (question row of each answer)."""

    def __init__(self, model: BlipModel, *, question_token_id: int | None = None, label_smoothing: float = 0.1):
        super().__init__()
        self.model = model
        self.question_token_id = question_token_id
        self.answer_loss = AnswerLoss(label_smoothing)

    def training_forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        model = self.model
        image_embeds = model.encode_image(batch["pixel_values"])
        q_mask = batch["attention_mask"]
        q_ids = _first_token(batch["input_ids"], self.question_token_id)
        q_states = model.encode_multimodal(q_ids, q_mask, image_embeds)  # (B, Lq, D)
        decoder = model.text_decoder
        cross = decoder.bert.cross_kv(q_states, q_mask, index=batch["answer_owner"])
        a_ids, targets = decoder_targets(
            batch["answer_ids"], batch["answer_mask"], bos_id=model.config.text.bos_token_id
        )
        logits = decoder(a_ids, batch["answer_mask"], cross=cross)
        loss = self.answer_loss(logits, targets, batch["answer_weights"], q_ids.shape[0])
        return {"vqa_loss": loss, "loss": loss}


class RetrievalTask(_ContrastiveTask):
    """ITC (all captions of an image are positives, `idx_queue`) + ITM with hard negatives from the online
    similarities, same-image pairs excluded.

    batch: `pixel_values`, `input_ids`/`attention_mask`, `image_ids` `[B]` (one id per distinct image)."""

    use_image_ids = True

    def training_forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        _, itc_loss, itm_loss = self.contrastive_losses(batch)
        return {"itc_loss": itc_loss, "itm_loss": itm_loss, "loss": itc_loss + itm_loss}


OBJECTIVES: dict[str, type[TrainTask]] = {  # by `TrainConfig.task`
    "pretrain": PretrainTask,
    "caption": CaptionTask,
    "vqa": VqaTask,
    "retrieval": RetrievalTask,
}
