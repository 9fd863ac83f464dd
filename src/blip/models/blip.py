"""BLIP: a ViT plus the MED text side, with the ITC, ITM and LM heads. Tensors in, tensors out.

Which parts exist depends on the checkpoint kind (`BlipConfig.kind`):
caption = ViT + decoder; vqa = ViT + image-grounded encoder + answer decoder (cross-attends to the question);
retrieval = ViT + encoder + ITC projections + ITM head; pretrain = all of them; nlvr = ViT + the twin
cross-attention encoder of `blip.models.nlvr` + its `cls_head` (one ViT pass over both images of a pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.config import KIND_PARTS, BlipConfig
from blip.models.bert import CrossKV, TextDecoder, TextTransformer
from blip.models.kernels import Linear
from blip.models.nlvr import ClsHead, NlvrTextTransformer
from blip.models.vit import VisionTransformer


class BlipModel(nn.Module):
    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        parts = KIND_PARTS[config.kind]
        text, vision_width = config.text, config.vision.hidden_size
        self.vision_model = VisionTransformer(config.vision)
        self.text_encoder = TextTransformer(text, vision_width) if "text_encoder" in parts else None
        self.cls_head = None
        if config.kind == "nlvr":
            self.text_encoder = NlvrTextTransformer(text, vision_width)
            self.cls_head = ClsHead(text.hidden_size)
        self.text_decoder = None
        if "text_decoder" in parts:
            # The VQA answer decoder reads question states, not image tokens.
            self.text_decoder = TextDecoder(text, text.hidden_size if config.kind == "vqa" else vision_width)
        if "heads" in parts:
            self.vision_proj = Linear(vision_width, config.embed_dim)
            self.text_proj = Linear(text.hidden_size, config.embed_dim)
            self.itm_head = Linear(text.hidden_size, 2)
        else:
            self.vision_proj = self.text_proj = self.itm_head = None

    # --- encoders ----------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels `[B, 3, S, S]` -> image tokens `[B, N, Dv]`."""
        return self.vision_model(pixel_values)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, first_only: bool = False
    ) -> torch.Tensor:
        """Unimodal text encoder (no image): `[B, T]` -> `[B, T, D]`; position 0 must be [CLS]. `first_only`
        computes only what position 0 needs in the last layer (for ITC features) and returns `[B, 1, D]`."""
        return self._require("text_encoder")(input_ids, attention_mask, first_only=first_only)

    def encode_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None = None,
        *,
        cross: CrossKV | None = None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """Image-grounded text encoder: text cross-attends to image tokens. Pass `image_embeds` or a prepared
        `cross` (from `image_cross_kv`, to share one image's projections across many texts). `first_only`: see
        `encode_text` (the ITM head reads position 0 only)."""
        encoder = self._require("text_encoder")
        if cross is None:
            cross = encoder.cross_kv(image_embeds)
        return encoder(input_ids, attention_mask, cross=cross, first_only=first_only)

    def image_cross_kv(self, image_embeds: torch.Tensor, index: torch.Tensor | None = None) -> CrossKV:
        return self._require("text_encoder").cross_kv(image_embeds, index=index)

    # --- heads -------------------------------------------------------------------------------------------------

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image features `[B, embed_dim]` from image tokens."""
        return F.normalize(self._require("vision_proj")(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text features `[B, embed_dim]` from unimodal text states."""
        return F.normalize(self._require("text_proj")(text_embeds[:, 0]), dim=-1)

    def itm_logits(self, multimodal_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, 2]` match logits from the image-grounded encoder's position 0; class 1 = match."""
        return self._require("itm_head")(multimodal_embeds[:, 0])

    def lm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced decoder logits `[B, T, V]` over `image_embeds` (or question states for VQA)."""
        decoder = self._require("text_decoder")
        return decoder(input_ids, attention_mask, cross=decoder.bert.cross_kv(image_embeds, image_mask))

    def reason_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
    ) -> torch.Tensor:
        """NLVR2: `[B, 2]` logits (class 1 = true) of statements (`[ENC]` at position 0) about image pairs, from
        each row's two images' tokens `[B, N, Dv]` (image a: the `self0` branch, image b: `self1`)."""
        head = self._require("cls_head")
        states = self.text_encoder(input_ids, attention_mask, image_a, image_b, first_only=True)  # (B, 1, D)
        return head(states[:, 0])

    def _require(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            raise ValueError(f"this {self.config.kind!r} model has no {part}")
        return module

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once: parameters() skips repeats
