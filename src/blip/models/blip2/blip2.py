"""BLIP-2: the EVA ViT, learned query tokens and the Q-Former, then either a language model (OPT or T5, fed the
projected query outputs as soft tokens) or the retrieval heads (ITC projections, ITM head). Tensors in and out.

Which parts exist depends on `Blip2Config.kind`: "opt" / "t5" = transformers' `Blip2ForConditionalGeneration`
(`language_projection`, `language_model`); "retrieval" = `Blip2ForImageTextRetrieval` (`embeddings`,
`vision_projection`, `text_projection`, `itm_head`). Parameter names are transformers', so its state dicts load as
they are. In a float16 model the query tokens and the Q-Former stay float32 (transformers' `_keep_in_fp32_modules`,
which 5.x applies to fp16 only; bf16 casts everything); their outputs are cast to the next module's dtype where
transformers casts them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip.blip2_config import Blip2Config
from blip.models.blip2.eva_vit import EvaVisionTransformer
from blip.models.blip2.qformer import QFormer, QFormerTextEmbeddings
from blip.models.kernels import Linear

KEEP_IN_FP32 = ("query_tokens", "qformer.")  # state-dict prefixes that stay float32 in an fp16 model


def keeps_fp32(key: str) -> bool:
    """Whether transformers keeps this parameter float32 in a float16 model: the query tokens, the Q-Former, and
    T5's feed-forward output projections `wo` (the language model's own `_keep_in_fp32_modules`)."""
    return key.startswith(KEEP_IN_FP32) or (key.startswith("language_model.") and "wo" in key.split("."))


def _language_model(config: Blip2Config) -> nn.Module:
    if config.kind == "t5":
        from blip.models.blip2.t5 import T5ForConditionalGeneration

        return T5ForConditionalGeneration(config.text)
    from blip.models.blip2.opt import OptForCausalLM

    return OptForCausalLM(config.text)


class Blip2Model(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        q = config.qformer
        self.vision_model = EvaVisionTransformer(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q)
        self.language_projection = self.language_model = None
        self.embeddings = self.vision_projection = self.text_projection = self.itm_head = None
        if config.kind == "retrieval":
            self.embeddings = QFormerTextEmbeddings(q)
            self.vision_projection = Linear(q.hidden_size, config.image_text_hidden_size)
            self.text_projection = Linear(q.hidden_size, config.image_text_hidden_size)
            self.itm_head = Linear(q.hidden_size, 2)
        else:
            self.language_projection = Linear(q.hidden_size, config.lm_width)
            self.language_model = _language_model(config)

    # --- image side ----------------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels `[B, 3, S, S]` -> image tokens `[B, N, Dv]` (in the vision model's dtype)."""
        return self.vision_model(pixel_values)

    def query_output(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image tokens `[B, N, Dv]` -> Q-Former outputs of the query tokens `[B, Q, Dq]` (the Q-Former's dtype)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, Dq)
        return self.qformer(queries, queries.shape[1], image=image_embeds)

    def language_inputs(self, query_output: torch.Tensor) -> torch.Tensor:
        """Q-Former outputs `[B, Q, Dq]` -> soft tokens for the language model `[B, Q, D_lm]`, in the LM's dtype."""
        projection = self._require("language_projection")
        # transformers casts the fp32 outputs down to the vision dtype, then projects (same dtype in our models).
        return projection(query_output.to(self.vision_model.post_layernorm.weight.dtype).to(projection.weight.dtype))

    # --- retrieval -----------------------------------------------------------------------------------------------

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC features of every query output `[B, Q, E]` (similarity = max over the Q)."""
        projection = self._require("vision_projection")
        return F.normalize(projection(self.query_output(image_embeds).to(projection.weight.dtype)), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised ITC text features `[B, E]`: the Q-Former over the text alone, at [CLS] (position 0)."""
        projection = self._require("text_projection")
        embeds = self._require("embeddings")(input_ids)  # (B, T, Dq)
        hidden = self.qformer(embeds, 0, attention_mask)  # (B, T, Dq)
        return F.normalize(projection(hidden[:, 0].to(projection.weight.dtype)), dim=-1)

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, 2]` match logits (class 1 = match): the ITM head on each query output of the Q-Former run over
        [queries; text] with the image, averaged over the queries."""
        head = self._require("itm_head")
        text = self._require("embeddings")(input_ids)  # (B, T, Dq), in the embeddings' dtype
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        embeds = torch.cat([queries.to(text.dtype), text], dim=1)  # (B, Q + T, Dq)
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], queries.shape[1])
            mask = torch.cat([ones, attention_mask], dim=1)
        hidden = self.qformer(embeds, queries.shape[1], mask, image_embeds)  # (B, Q + T, Dq)
        return head(hidden[:, : queries.shape[1]].to(head.weight.dtype)).mean(dim=1)

    def _require(self, part: str) -> nn.Module:
        module = getattr(self, part)
        if module is None:
            raise ValueError(f"this {self.config.kind!r} BLIP-2 model has no {part}")
        return module

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once: parameters() skips repeats
