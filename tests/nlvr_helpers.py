"""NLVR2 test material: `model_base_nlvr.pth`'s key layout written out from the original code's modules (not from our
converter), a random-weight file of it at tiny sizes, and an independent plain-tensor forward of the original.

The layout (original `BLIP_NLVR`, docs/checkpoints.md): `visual_encoder.*` (timm ViT names), `text_encoder.*` (BERT with
`crossattention.self0/self1`, `crossattention.output.{dense0,dense1,LayerNorm}`, `crossattention.output.merge_layer` [H,
2H] in layers 6-11 of 12, i.e. the second half), `cls_head.{0,2}`; saved as {"model": state_dict}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from oracle import write_vocab


@dataclass(frozen=True)
class NlvrSizes:
    vision: int = 64
    vision_layers: int = 2
    vision_mlp: int = 96
    image_size: int = 32
    patch: int = 8
    text: int = 64
    text_layers: int = 4
    text_ffn: int = 96
    positions: int = 64
    vocab: int = 0  # set from the tokenizer


BASE = NlvrSizes(768, 12, 3072, 384, 16, 768, 12, 3072, 512, 30524)


def nlvr_shapes(s: NlvrSizes) -> dict[str, tuple[int, ...]]:
    """Every key of an original NLVR2 file with its shape, spelled out from the original modules."""
    D, H = s.vision, s.text
    grid = s.image_size // s.patch
    out: dict[str, tuple[int, ...]] = {
        "visual_encoder.cls_token": (1, 1, D),
        "visual_encoder.pos_embed": (1, grid * grid + 1, D),
        "visual_encoder.patch_embed.proj.weight": (D, 3, s.patch, s.patch),
        "visual_encoder.patch_embed.proj.bias": (D,),
    }
    for i in range(s.vision_layers):
        b = f"visual_encoder.blocks.{i}."
        for name, shape in (
            ("norm1", (D,)),
            ("attn.qkv", (3 * D, D)),
            ("attn.proj", (D, D)),
            ("norm2", (D,)),
            ("mlp.fc1", (s.vision_mlp, D)),
            ("mlp.fc2", (D, s.vision_mlp)),
        ):
            out[b + name + ".weight"] = shape
            out[b + name + ".bias"] = (shape[0],)
    out["visual_encoder.norm.weight"] = out["visual_encoder.norm.bias"] = (D,)

    t = "text_encoder."
    out[t + "embeddings.position_ids"] = (1, s.positions)
    out[t + "embeddings.word_embeddings.weight"] = (s.vocab, H)
    out[t + "embeddings.position_embeddings.weight"] = (s.positions, H)
    out[t + "embeddings.LayerNorm.weight"] = out[t + "embeddings.LayerNorm.bias"] = (H,)
    for i in range(s.text_layers):
        layer = f"{t}encoder.layer.{i}."
        linears = [
            ("attention.self.query", (H, H)),
            ("attention.self.key", (H, H)),
            ("attention.self.value", (H, H)),
            ("attention.output.dense", (H, H)),
            ("attention.output.LayerNorm", None),
        ]
        for twin in ("self0", "self1"):
            linears += [(f"crossattention.{twin}.query", (H, H))]
            linears += [(f"crossattention.{twin}.{kv}", (H, D)) for kv in ("key", "value")]
        linears += [
            ("crossattention.output.dense0", (H, H)),
            ("crossattention.output.dense1", (H, H)),
            ("crossattention.output.LayerNorm", None),
        ]
        if i >= s.text_layers // 2:  # layers 6-11 of 12
            linears.append(("crossattention.output.merge_layer", (H, 2 * H)))
        linears += [
            ("intermediate.dense", (s.text_ffn, H)),
            ("output.dense", (H, s.text_ffn)),
            ("output.LayerNorm", None),
        ]
        for name, shape in linears:
            shape = shape or (H,)
            out[layer + name + ".weight"] = shape
            out[layer + name + ".bias"] = (shape[0],)
    out["cls_head.0.weight"], out["cls_head.0.bias"] = (H, H), (H,)
    out["cls_head.2.weight"], out["cls_head.2.bias"] = (2, H), (2,)
    return out


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1])[None]
        elif "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias") or "norm" in key.lower():
            state[key] = 0.05 * torch.randn(shape, generator=g)
        elif "embed" in key or key.endswith(("cls_token", "pos_embed")):
            state[key] = 0.5 * torch.randn(shape, generator=g)
        else:
            state[key] = (
                torch.randn(shape, generator=g) / shape[-1] ** 0.5
                if len(shape) == 2
                else (torch.randn(shape, generator=g) * 0.1)
            )
    return state


def write_nlvr_checkpoint(folder: Path, seed: int = 0, sizes: NlvrSizes = NlvrSizes()) -> tuple[Path, Path, dict]:
    """(the .pth, a tokenizer folder, the state dict) of a random original-layout NLVR2 model. The vocabulary is
    bert-base's 30524 rows, as in the real file (a config inferred from the shapes assumes [DEC] = 30522); the
    tokenizer uses its first few ids."""
    folder.mkdir(parents=True, exist_ok=True)
    write_vocab(folder)
    sizes = NlvrSizes(**{**sizes.__dict__, "vocab": 30524})
    state = random_state(nlvr_shapes(sizes), seed)
    path = folder / "model_base_nlvr.pth"
    torch.save({"model": state, "epoch": 14}, path)
    return path, folder, state


# --- the original model in plain tensor ops -------------------------------------------------------------------------


def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _attend(q, k, v, heads, mask=None):
    B, T, W = q.shape
    d = W // heads
    q = q.view(B, T, heads, d).transpose(1, 2)
    k = k.view(B, k.shape[1], heads, d).transpose(1, 2)
    v = v.view(B, v.shape[1], heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / d**0.5
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0  # the original's extended mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, W)


def reference_vit(sd, pixels, heads, layers, eps):
    p = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(
        pixels, sd["visual_encoder.patch_embed.proj.weight"], sd["visual_encoder.patch_embed.proj.bias"], stride=p
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["visual_encoder.pos_embed"]
    D = x.shape[-1]
    for i in range(layers):
        b = f"visual_encoder.blocks.{i}."
        h = _ln(x, sd, b + "norm1", eps)
        q, k, v = _lin(h, sd, b + "attn.qkv").split(D, dim=-1)
        x = x + _lin(_attend(q, k, v, heads), sd, b + "attn.proj")
        h = _ln(x, sd, b + "norm2", eps)
        x = x + _lin(F.gelu(_lin(h, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, "visual_encoder.norm", eps)


def reference_logits(sd, ids, mask, image0, image1, heads, layers, eps=1e-12):
    """BLIP_NLVR's text encoder + cls_head on `[ENC]`-first ids; image0/image1 the two images' tokens per row."""
    t = "text_encoder."
    T = ids.shape[1]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:T]
    x = _ln(x, sd, t + "embeddings.LayerNorm", eps)
    for i in range(layers):
        L = f"{t}encoder.layer.{i}."
        q, k, v = (_lin(x, sd, L + f"attention.self.{n}") for n in ("query", "key", "value"))
        x = _ln(
            x + _lin(_attend(q, k, v, heads, mask), sd, L + "attention.output.dense"),
            sd,
            L + "attention.output.LayerNorm",
            eps,
        )
        outs = []
        for twin, image in (("0", image0), ("1", image1)):
            c = L + f"crossattention.self{twin}."
            y = _attend(_lin(x, sd, c + "query"), _lin(image, sd, c + "key"), _lin(image, sd, c + "value"), heads)
            outs.append(_lin(y, sd, L + f"crossattention.output.dense{twin}"))
        if L + "crossattention.output.merge_layer.weight" in sd:
            h = _lin(torch.cat(outs, -1), sd, L + "crossattention.output.merge_layer")
        else:
            h = (outs[0] + outs[1]) / 2
        x = _ln(x + h, sd, L + "crossattention.output.LayerNorm", eps)
        ffn = _lin(F.gelu(_lin(x, sd, L + "intermediate.dense")), sd, L + "output.dense")
        x = _ln(x + ffn, sd, L + "output.LayerNorm", eps)
    return _lin(torch.relu(_lin(x[:, 0], sd, "cls_head.0")), sd, "cls_head.2")
