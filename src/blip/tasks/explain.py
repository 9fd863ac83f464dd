"""Grad-CAM for image-text matching: which image patches the ITM head's "match" leans on, per word of the text.

The method of the BLIP authors' LAVIS (`compute_gradcam` for `blip_image_text_matching`, after ALBEF):
- run the image-grounded text encoder on (image, text) and take the ITM head's *match logit* (class 1);
- at one cross-attention layer (`layer`, 0-based; default `depth // 2`, LAVIS's `block_num=6` of BLIP's 12; not the
  last, whose word rows never reach the ITM head: it reads [CLS] only), take
  the attention probabilities `A` `[H, T, N]` (text tokens over image tokens, before dropout) and the gradient `G`
  of the match logit with respect to them;
- per text token t: `mean over heads of A[h, t, 1:] * relu(G[h, t, 1:])`, the image [CLS] token dropped, the
  remaining N - 1 = g*g patch tokens laid out as the patch grid `[g, g]`.
[CLS] (position 0) and the closing [SEP] are left out: LAVIS's average map also covers the tokens between them only.

Words: the text's whitespace-separated pieces, as written ("beach." is one word). Each word's map is the *sum* of the
maps of its word pieces (the tokenizer's offsets say which pieces fall inside it), and the whole-text map is the sum of
the word maps, so `word_maps.sum(0) == text_map`. LAVIS's "average gradcam" is `text_map / n_pieces` (its mean over
the same pieces): the same picture, a different scale. Maps are non-negative; they are not normalised.

Rendering (`overlay`, `write_explanation`): each map scaled to its own maximum, upsampled (bicubic) onto the image as
given (the model saw it squashed to a square, so the grid covers the whole image), a jet-coloured translucent overlay.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from blip.models.bert import AttentionProbe
from blip.tasks.common import MAX_TEXT_TOKENS, model_input

if TYPE_CHECKING:
    from blip.api import Blip


BLIP2_REFUSAL = (
    "explain (ITM Grad-CAM) needs BLIP's image-grounded text encoder, whose words cross-attend to the image patches; "
    "in BLIP-2 only the Q-Former's query tokens attend to the image and the text reaches it through them, so there is "
    "no per-word map: use a BLIP retrieval checkpoint (e.g. Salesforce/blip-itm-base-coco)"
)


@dataclass
class Explanation:
    """Grad-CAM maps of one (image, text) pair; every map is `[g, g]` over the model's patch grid, float32 >= 0."""

    text: str
    words: list[str]  # the text's whitespace-separated words, as written
    word_maps: np.ndarray  # [n_words, g, g]: each word's map (the sum of its word pieces' maps)
    text_map: np.ndarray  # [g, g]: the whole text's map, word_maps.sum(0)
    score: float  # ITM P(match) of the pair (what `match` gives)
    layer: int  # the cross-attention layer used (0-based)
    tokens: list[str]  # the word pieces between [CLS] and [SEP]
    token_maps: np.ndarray  # [n_tokens, g, g]: one map per word piece
    word_tokens: list[list[int]]  # indices into `tokens` of each word's pieces

    @property
    def grid(self) -> int:
        return int(self.text_map.shape[-1])


def default_layer(depth: int) -> int:
    """LAVIS's BLIP default, `block_num=6` of 12 layers, for any depth: the middle layer (never the last, see
    `check_layer`)."""
    return max(0, min(depth // 2, depth - 2))


def check_layer(layer: object, depth: int) -> int:
    """A usable layer: 0 .. depth - 2. The last layer is refused: the ITM head reads [CLS] only, so no word's row of
    that layer's attention reaches the score and every map would be zero."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an integer, got {layer!r}")
    if depth < 2:
        raise ValueError(
            "this model's image-grounded encoder has 1 layer: its words' attention never reaches the ITM "
            "head (it reads [CLS] only), so there is nothing to explain"
        )
    if not 0 <= layer < depth - 1:
        last = (
            " (the last one's word rows never reach the ITM head, which reads [CLS] only)" if layer == depth - 1 else ""
        )
        raise ValueError(
            f"layer {layer} is out of range: explain reads layers 0-{depth - 2} of this model's {depth}-layer "
            f"image-grounded encoder{last}"
        )
    return layer


def words_of(text: str, offsets: list[tuple[int, int]]) -> tuple[list[str], list[list[int]]]:
    """Group word pieces (their character `offsets` in `text`) into the text's whitespace-separated words.
    Returns (words, piece indices of each word); words without pieces (nothing the tokenizer kept) are dropped."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    groups: list[list[int]] = [[] for _ in spans]
    w = 0
    for piece, (start, _) in enumerate(offsets):
        while w < len(spans) and start >= spans[w][1]:
            w += 1
        if w == len(spans):
            raise ValueError(f"word piece {piece} at {start} lies outside the text")  # tokenizer offsets are in-text
        groups[w].append(piece)
    kept = [(text[a:b], g) for (a, b), g in zip(spans, groups) if g]
    return [word for word, _ in kept], [g for _, g in kept]


def check_request(blip: Blip, text: str, layer: int | None = None) -> tuple[list[int], list[tuple[int, int]], int]:
    """What `explain_pair` checks before any work (one-line ValueErrors): the text (not empty, at most
    `MAX_TEXT_TOKENS` tokens) and the layer. Returns (ids, their character offsets, the layer)."""
    depth = len(blip.model.text_encoder.layers)
    layer = default_layer(depth) if layer is None else check_layer(layer, depth)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty")
    ids, offsets = blip.tokenizer.encode_with_offsets(text)
    if len(ids) > MAX_TEXT_TOKENS:
        raise ValueError(
            f"text is {len(ids)} tokens long ([CLS] and [SEP] included); explain takes at most {MAX_TEXT_TOKENS}, "
            f"the length the ITM checkpoints were trained with: shorten it"
        )
    if len(ids) < 3:
        raise ValueError(f"text {text!r} has no word pieces to explain")
    return ids, offsets, layer


def explain_pair(blip: Blip, image: Image.Image, text: str, layer: int | None = None) -> Explanation:
    """Grad-CAM maps of the ITM match logit for `image` and `text` (see the module docstring)."""
    ids, offsets, layer = check_request(blip, text, layer)
    with torch.inference_mode(False):  # a caller's inference mode would leave nothing to differentiate
        return _explain(blip, image, text, ids, offsets, layer)


def _explain(
    blip: Blip, image: Image.Image, text: str, ids: list[int], offsets: list[tuple[int, int]], layer: int
) -> Explanation:
    model = blip.model
    device = next(model.parameters()).device
    with torch.no_grad():
        image_embeds = model.encode_image(model_input(blip.transform([image]), model))  # (1, N, Dv)
        cross = model.image_cross_kv(image_embeds)
    patches = image_embeds.shape[1] - 1
    grid = int(round(patches**0.5))
    if grid * grid != patches:
        raise ValueError(f"the image tokens ({patches} patches after [CLS]) do not form a square grid")
    cross.probe = AttentionProbe(layer)
    input_ids = torch.tensor([ids], device=device)
    with torch.enable_grad():
        states = model.encode_multimodal(input_ids, None, cross=cross)
        logits = model.itm_logits(states).float()  # (1, 2)
        probs = cross.probe.probs  # (1, H, T, N)
        (grads,) = torch.autograd.grad(logits[0, 1], probs)
    score = float(logits.detach().softmax(-1)[0, 1])
    cams = (probs.detach() * grads.clamp(min=0))[0, :, 1:-1, 1:].mean(0)  # (T - 2, g*g): heads averaged
    token_maps = cams.reshape(-1, grid, grid).cpu().numpy().astype(np.float32)
    words, word_tokens = words_of(text, offsets[1:-1])
    word_maps = np.stack([token_maps[g].sum(0) for g in word_tokens]).astype(np.float32)
    return Explanation(
        text=text,
        words=words,
        word_maps=word_maps,
        text_map=word_maps.sum(0).astype(np.float32),
        score=score,
        layer=layer,
        tokens=blip.tokenizer.convert_ids_to_tokens(ids[1:-1]),
        token_maps=token_maps,
        word_tokens=word_tokens,
    )


# --- rendering -----------------------------------------------------------------------------------------------------

OVERLAY_SIZE = 384  # longest side of a rendered map, in pixels


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> cyan -> yellow -> red) of values in [0, 1]: `[..., 3]` in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks at x = 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)


def overlay(image: Image.Image, heat: np.ndarray, size: int = OVERLAY_SIZE, strength: float = 0.75) -> Image.Image:
    """`image` (longest side `size`) with `heat` `[g, g]` over it: scaled to its own maximum, upsampled bicubically
    to the image, jet-coloured, blended with weight `strength * heat ** 0.7` (LAVIS's `getAttMap` uses the 0.7 too)."""
    rgb = _fit(image, size)
    heat = np.asarray(heat, dtype=np.float32)
    peak = float(heat.max()) if heat.size else 0.0
    unit = heat / peak if peak > 0 else np.zeros_like(heat)
    up = np.asarray(Image.fromarray(unit, mode="F").resize(rgb.size, Image.Resampling.BICUBIC), dtype=np.float32)
    up = np.clip(up, 0.0, 1.0)
    weight = strength * up[..., None] ** 0.7
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    blended = (1.0 - weight) * pixels + weight * jet(up)
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def map_files(explanation: Explanation) -> list[tuple[str, str, np.ndarray]]:
    """(file name, label, map) of every rendered map: the whole text first, then each word in order."""
    files = [("text.png", explanation.text, explanation.text_map)]
    for i, (word, heat) in enumerate(zip(explanation.words, explanation.word_maps)):
        safe = re.sub(r"[^a-z0-9]+", "_", word.lower()).strip("_") or "word"
        files.append((f"word{i:02d}_{safe[:32]}.png", word, heat))
    return files


def contact_sheet(image: Image.Image, explanation: Explanation, tile: int = 192, columns: int = 4) -> Image.Image:
    """One PNG-ready picture: the image, the whole-text map and every word's map, each labelled."""
    tiles = [("image", image, None)] + [(label, image, heat) for _, label, heat in map_files(explanation)]
    tiles[1] = (f"whole text (P(match) {explanation.score:.3f}, layer {explanation.layer})", image, tiles[1][2])
    label_h = 18
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h) + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), explanation.text[:120], fill="black")
    for i, (label, picture, heat) in enumerate(tiles):
        x, y = (i % columns) * tile, label_h + (i // columns) * (tile + label_h)
        shown = overlay(picture, heat, size=tile) if heat is not None else _fit(picture, tile)
        sheet.paste(shown, (x + (tile - shown.width) // 2, y + (tile - shown.height) // 2))
        draw.text((x + 4, y + tile + 3), label[:40], fill="black")
    return sheet


def _fit(image: Image.Image, size: int) -> Image.Image:
    """`image` as RGB, resized (bicubic) to longest side `size`."""
    rgb = image.convert("RGB")
    scale = size / max(rgb.size)
    return rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BICUBIC)


def write_explanation(image: Image.Image, explanation: Explanation, out: str | Path) -> Path:
    """Write one PNG per map (`text.png`, `wordNN_<word>.png`), `sheet.png` (all of them) and `index.html` showing
    them into `out`; returns the HTML path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, label, heat in map_files(explanation):
        overlay(image, heat).save(folder / name)
        caption = "whole text" if name == "text.png" else html.escape(label)
        figures.append(f'<figure><img src="{name}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    contact_sheet(image, explanation).save(folder / "sheet.png")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Grad-CAM: {html.escape(explanation.text)}</title>
<style>
body {{ font: 15px system-ui, sans-serif; margin: 24px; color: #222; }}
.maps {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; text-align: center; }}
figure img {{ max-width: 256px; display: block; border: 1px solid #ddd; }}
figcaption {{ margin-top: 4px; font-weight: 600; }}
</style></head><body>
<h1>Grad-CAM of image-text matching</h1>
<p>Text: <q>{html.escape(explanation.text)}</q> &middot; P(match) {explanation.score:.4f} &middot;
cross-attention layer {explanation.layer} &middot; patch grid {explanation.grid}&times;{explanation.grid}</p>
<p>Each map is the ITM match logit's gradient (ReLU) times the attention of the text on the image patches, averaged
over heads; a word sums its word pieces, the whole text sums the words. Each picture is scaled to its own maximum.</p>
<div class="maps">
{chr(10).join(figures)}
</div>
</body></html>
"""
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
