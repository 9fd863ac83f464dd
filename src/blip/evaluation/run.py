"""Running a model over an evaluation set: captioning (BLEU/CIDEr-D/ROUGE-L), VQA accuracy, retrieval R@K.

Inference goes through the same functions users call (`Blip.caption`, `Blip.answer`, the model's ITC/ITM entry
points); the metrics are `blip.evaluation`'s coco-caption / official-VQA / BLIP `itm_eval` equivalents.

- Captioning: beam search (3 beams, 5..20 new tokens, as the paper's COCO evaluation) with the fine-tuning prompt;
  the prompt is cut from the caption before scoring, as the original evaluation does.
- VQA: generated answers (or `answer_list` rank mode); accuracy overall and per answer type.
- Retrieval: ITC similarities for all pairs, then the top `k_test` candidates of each image (and of each text)
  re-scored with `ITM logit + ITC similarity`, everything else -100 (BLIP's `evaluation` in train_retrieval.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip.data.manifests import Question, SkipLog, read_caption_rows, read_questions, resolve_sources
from blip.evaluation.caption_metrics import caption_scores
from blip.evaluation.plots import plot_caption_examples, plot_metrics
from blip.evaluation.retrieval_metrics import recall_at_k
from blip.evaluation.vqa_metrics import vqa_evaluate
from blip.tasks.common import MAX_TEXT_TOKENS, chunks, model_input
from blip.transforms import load_image

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)
# The papers' test-time decoding, not the user-facing defaults of `blip.tasks.options`: captions by beam search
# (3 beams, 5-20 tokens), VQA answers greedy up to 10 tokens.
CAPTION_EVAL_BEAMS, CAPTION_EVAL_MAX_TOKENS, CAPTION_EVAL_MIN_TOKENS = 3, 20, 5
VQA_EVAL_BEAMS, VQA_EVAL_MAX_TOKENS = 1, 10


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]


def _strip_prompt(text: str, prompt: str) -> str:
    prompt = prompt.strip().lower()
    text = text.strip()
    return text[len(prompt) :].strip() if prompt and text.lower().startswith(prompt) else text


def caption_rows(data: str, split: str = "test", max_images: int = 0) -> list[dict[str, Any]]:
    """`{"id", "image", "captions"}` per test image from a dataset folder, a test manifest, a Karpathy file (its
    `split`) or COCO caption annotations."""
    skips = SkipLog()
    rows = []
    for source in resolve_sources(data, "caption", "" if split == "test" else split, purpose="eval"):
        rows += read_caption_rows(source, split=split, skips=skips)
    skips.report(f"evaluation data {data}")
    return rows[:max_images] if max_images else rows


def question_rows(data: str, split: str = "test", max_images: int = 0) -> list[Question]:
    """Test questions (with their human answers) about at most `max_images` distinct images."""
    skips = SkipLog()
    questions: list[Question] = []
    for source in resolve_sources(data, "vqa", "" if split == "test" else split, purpose="eval"):
        questions += read_questions(source, skips=skips)
    skips.report(f"evaluation data {data}")
    questions = [q for q in questions if q.answers]
    if max_images:
        images: dict[str, None] = {}
        kept = []
        for q in questions:
            if q.image not in images and len(images) >= max_images:
                continue
            images.setdefault(q.image)
            kept.append(q)
        questions = kept
    return questions


def evaluate_caption(
    blip: Blip,
    rows: list[dict[str, Any]],
    *,
    prompt: str = "",
    num_beams: int = CAPTION_EVAL_BEAMS,
    max_new_tokens: int = CAPTION_EVAL_MAX_TOKENS,
    min_new_tokens: int = CAPTION_EVAL_MIN_TOKENS,
) -> EvalResult:
    captions = blip.caption(
        [r["image"] for r in rows],
        prompt=prompt or None,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
    )
    cands = {i: _strip_prompt(c.text, prompt) for i, c in enumerate(captions)}
    refs = {i: r["captions"] for i, r in enumerate(rows)}
    metrics = caption_scores(refs, cands)
    predictions = [
        {"id": r["id"], "image": r["image"], "caption": cands[i], "references": r["captions"]}
        for i, r in enumerate(rows)
    ]
    return EvalResult("caption", metrics, predictions)


def evaluate_vqa(
    blip: Blip,
    questions: list[Question],
    *,
    answer_list: list[str] | None = None,
    num_beams: int = VQA_EVAL_BEAMS,
    max_new_tokens: int = VQA_EVAL_MAX_TOKENS,
) -> EvalResult:
    answers = blip.answer(
        [q.image for q in questions],
        [q.question for q in questions],
        answers=answer_list,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    )
    predictions = [a.text for a in answers]
    types = [q.answer_type or "all" for q in questions]
    result = vqa_evaluate(predictions, [list(q.answers) for q in questions], types)
    metrics = {"accuracy": result.overall, **{f"accuracy_{t}": v for t, v in result.per_answer_type.items()}}
    rows = [
        {
            "question_id": q.question_id,
            "image": q.image,
            "question": q.question,
            "answer": p,
            "answers": list(q.answers),
        }
        for q, p in zip(questions, predictions)
    ]
    return EvalResult("vqa", metrics, rows)


@torch.inference_mode()
def _itm_scores(
    blip: Blip,
    image_embeds: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch: int = 256,
) -> torch.Tensor:
    """ITM match logits for the (image_index[p], text_index[p]) pairs."""
    model = blip.model
    out = torch.empty(len(image_index))
    for chunk in chunks(len(image_index), batch):
        rows = torch.tensor(list(chunk))
        images, inverse = image_index[rows].unique(return_inverse=True)
        device = image_embeds.device
        cross = model.image_cross_kv(image_embeds[images.to(device)], index=inverse.to(device))
        texts = text_index[rows].to(device)
        states = model.encode_multimodal(ids[texts], mask[texts], cross=cross, first_only=True)
        out[rows] = model.itm_logits(states)[:, 1].float().cpu()
    return out


@torch.inference_mode()
def retrieval_scores(blip: Blip, images: list[str], texts: list[str], k_test: int = 16) -> tuple[torch.Tensor, ...]:
    """(ITC similarity `[n_img, n_txt]`, re-ranked i2t scores, re-ranked t2i scores `[n_txt, n_img]`)."""
    model, tokenizer = blip.model, blip.tokenizer
    device = next(model.parameters()).device
    embeds, feats = [], []
    for chunk in chunks(len(images), blip.batch_size):
        pixels = model_input(blip.transform([load_image(images[i]) for i in chunk]), model)
        e = model.encode_image(pixels)
        embeds.append(e)
        feats.append(model.image_features(e).float())
    image_embeds, image_feat = torch.cat(embeds), torch.cat(feats)
    ids, mask = tokenizer(texts, max_length=MAX_TEXT_TOKENS)
    ids, mask = ids.to(device), mask.to(device)
    text_feat = torch.cat(
        [
            model.text_features(model.encode_text(ids[c], mask[c], first_only=True)).float()
            for c in (slice(r.start, r.stop) for r in chunks(len(texts), 256))
        ]
    )
    sims = (image_feat @ text_feat.T).cpu()  # (n_img, n_txt)
    n_img, n_txt = sims.shape
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    top_t = sims.topk(k_i2t, dim=1).indices  # (n_img, k)
    img_idx = torch.arange(n_img).repeat_interleave(k_i2t)
    itm = _itm_scores(blip, image_embeds, ids, mask, img_idx, top_t.reshape(-1))
    i2t = torch.full((n_img, n_txt), -100.0)
    i2t[img_idx, top_t.reshape(-1)] = itm + sims[img_idx, top_t.reshape(-1)]
    top_i = sims.T.topk(k_t2i, dim=1).indices  # (n_txt, k)
    txt_idx = torch.arange(n_txt).repeat_interleave(k_t2i)
    itm = _itm_scores(blip, image_embeds, ids, mask, top_i.reshape(-1), txt_idx)
    t2i = torch.full((n_txt, n_img), -100.0)
    t2i[txt_idx, top_i.reshape(-1)] = itm + sims[top_i.reshape(-1), txt_idx]
    return sims, i2t, t2i


def evaluate_retrieval(blip: Blip, rows: list[dict[str, Any]], *, k_test: int = 16) -> EvalResult:
    texts, txt2img, img2txts = [], [], []
    for i, row in enumerate(rows):
        img2txts.append(list(range(len(texts), len(texts) + len(row["captions"]))))
        texts += row["captions"]
        txt2img += [i] * len(row["captions"])
    sims, i2t, t2i = retrieval_scores(blip, [r["image"] for r in rows], texts, k_test)
    metrics = recall_at_k(i2t, txt2img, img2txts, scores_t2i=t2i)
    itc_only = recall_at_k(sims, txt2img, img2txts)
    metrics.update({f"itc_{k}": v for k, v in itc_only.items() if k in ("tr_r1", "ir_r1", "r_mean")})
    best = i2t.argmax(1).tolist()
    predictions = [
        {"id": r["id"], "image": r["image"], "best_text": texts[best[i]], "correct": txt2img[best[i]] == i}
        for i, r in enumerate(rows)
    ]
    return EvalResult("retrieval", metrics, predictions)


def evaluate(
    blip: Blip,
    task: str,
    data: str,
    *,
    split: str = "test",
    max_images: int = 0,
    prompt: str = "",
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int = CAPTION_EVAL_MIN_TOKENS,
    vqa_mode: str = "generate",
    k_test: int = 16,
    num_frames: int = 8,
) -> EvalResult:
    """Evaluate `blip` on the `task` test split of `data` (a dataset folder or a test file; video_retrieval: a clip
    manifest, `blip.evaluation.video`)."""
    if task == "caption":
        return evaluate_caption(
            blip,
            caption_rows(data, split, max_images),
            prompt=prompt,
            num_beams=CAPTION_EVAL_BEAMS if num_beams is None else num_beams,
            max_new_tokens=max_new_tokens or CAPTION_EVAL_MAX_TOKENS,
            min_new_tokens=min_new_tokens,
        )
    if task == "vqa":
        answer_list = None
        if vqa_mode == "rank":
            path = Path(data) / "answer_list.json" if Path(data).is_dir() else Path(data).with_name("answer_list.json")
            if not path.is_file():
                raise FileNotFoundError(f"rank-mode VQA needs an answer list: {path} not found")
            answer_list = json.loads(path.read_text())
        return evaluate_vqa(
            blip,
            question_rows(data, split, max_images),
            answer_list=answer_list,
            num_beams=VQA_EVAL_BEAMS if num_beams is None else num_beams,
            max_new_tokens=max_new_tokens or VQA_EVAL_MAX_TOKENS,
        )
    if task == "retrieval":
        return evaluate_retrieval(blip, caption_rows(data, split, max_images), k_test=k_test)
    if task == "video_retrieval":
        from blip.evaluation.video import evaluate_video_retrieval, read_clips

        return evaluate_video_retrieval(blip, read_clips(data), num_frames=num_frames, k_test=k_test)
    if task == "nlvr":
        from blip.data.nlvr import nlvr_source, read_nlvr_pairs
        from blip.evaluation.nlvr import evaluate_nlvr

        pairs = read_nlvr_pairs(nlvr_source(data, split))
        return evaluate_nlvr(blip, pairs[:max_images] if max_images else pairs)
    raise ValueError(f"unknown evaluation task {task!r}: caption, vqa, retrieval, video_retrieval or nlvr")


def write_result(result: EvalResult, out_dir: str | Path, *, name: str | None = None, plots: bool = True) -> Path:
    """`<name>.json` (metrics), `<name>_predictions.jsonl`, and PNG plots, in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or f"eval_{result.task}"
    (out / f"{name}.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
    with (out / f"{name}_predictions.jsonl").open("w") as f:
        for row in result.predictions:
            f.write(json.dumps(row, default=str) + "\n")
    if plots:
        plot_metrics(result.metrics, out / f"{name}.png", title=f"{result.task} evaluation")
        if result.task == "caption":
            plot_caption_examples(result.predictions, out / f"{name}_examples.png")
    return out / f"{name}.json"
