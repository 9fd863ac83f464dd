"""Everything about one image: its scene and manifest rows, a pure function of (seed, split, index)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from blip.data.shapes.grammar import corrupt, references, swappable_attributes
from blip.data.shapes.parse import check_caption
from blip.data.shapes.qa import questions
from blip.data.shapes.scene import NOISE_KINDS, SPLITS, Scene, ShapesConfig, sample_scene


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    return random.Random(f"blip.shapes/{seed}/{split}/{index}/{purpose}")


def scene_for(split: str, index: int, *, seed: int = 0, cfg: ShapesConfig = ShapesConfig()) -> Scene:
    """The scene of image ``index`` of ``split``."""
    return sample_scene(_rng(seed, split, index, "scene"), cfg)


def image_path(split: str, index: int) -> str:
    """Where an image lives, relative to the dataset folder."""
    return f"images/{split}/{index:06d}.png"


@dataclass(frozen=True)
class Example:
    """One image of a split: its scene and the manifest rows it contributes (``rows[manifest] -> list of rows``)."""

    split: str
    index: int
    scene: Scene
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def image(self) -> str:
        return image_path(self.split, self.index)


def _unrelated_source(index: int, rng: random.Random) -> int:
    """Another image of the web split: an earlier one when there are enough, else one of the first 64."""
    if index >= 16:
        return rng.randrange(index)
    return rng.choice([j for j in range(64) if j != index])


def _qa_rows(split: str, index: int, scene: Scene, rng: random.Random, cfg: ShapesConfig) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{split}-{index:06d}-{k}",
            "question_id": index * 100 + k,
            "image_id": index,
            "image": image_path(split, index),
            "question": qa.question,
            "answer": qa.answer,
            "answers": list(qa.answers),
            "answer_type": qa.answer_type,
            "question_type": qa.question_type,
        }
        for k, qa in enumerate(questions(scene, rng, cfg.questions_per_image, human_noise=cfg.human_noise))
    ]


def make_example(split: str, index: int, *, seed: int = 0, cfg: ShapesConfig = ShapesConfig()) -> Example:
    """Regenerate one image's scene and manifest rows exactly as `generate` writes them (render the image with
    ``render(example.scene, cfg)``).

    ``clean`` -> rows["clean"]; ``test`` -> rows["test"] and rows["vqa_test"]; ``vqa`` -> rows["vqa"];
    ``web`` -> rows["web"].
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    scene = scene_for(split, index, seed=seed, cfg=cfg)
    ident, image = f"{split}-{index:06d}", image_path(split, index)
    rows: dict[str, list[dict[str, Any]]] = {}
    if split in ("clean", "test"):
        caps = references(scene, _rng(seed, split, index, "text"), cfg.n_references)
        rows[split] = [{"id": ident, "image": image, "captions": caps, "scene": scene.to_dict()}]
    if split in ("vqa", "test"):
        name = "vqa" if split == "vqa" else "vqa_test"
        rows[name] = _qa_rows(split, index, scene, _rng(seed, split, index, "qa"), cfg)
    if split == "web":
        rng = _rng(seed, split, index, "text")
        noise = rng.choices(NOISE_KINDS, weights=cfg.noise_rates)[0]
        detail: str | None = None
        source: str | None = None
        if noise == "partial":
            detail = rng.choice(swappable_attributes(scene))
            caption = corrupt(scene, noise, rng, attribute=detail)
        elif noise == "unrelated":
            for _ in range(50):  # another image's caption that happens to be true here is no noise: draw again
                j = _unrelated_source(index, rng)
                caption = corrupt(scene, noise, rng, other=scene_for(split, j, seed=seed, cfg=cfg))
                if not check_caption(scene, caption):
                    break
            source = f"{split}-{j:06d}"
        else:
            caption = corrupt(scene, noise, rng)
        rows["web"] = [
            {
                "id": ident,
                "image": image,
                "caption": caption,
                "noise": noise,
                "noise_detail": detail,
                "source": source,
                "scene": scene.to_dict(),
            }
        ]
    return Example(split, index, scene, rows)
