"""The shapes world: a seeded synthetic image-text dataset with the structure BLIP exploits.

Each image is a plain background with 1-3 coloured shapes (circle, square, triangle, star, diamond), each small or
large, at one of five non-colliding positions (left, right, top, bottom, center), with light texture noise. A scene
(`Scene`) describes the image exactly, so every caption, question and answer can be checked against it.

Everything is a pure function of ``(seed, split, index)``: any image or manifest row can be regenerated alone
(`make_example`), generation runs in parallel and resumes where it stopped. The splits stand in for the datasets BLIP
trains and evaluates on:

- ``clean`` (COCO): 5 reference captions per image, paraphrases of the true scene.
- ``web`` (the noisy web): one caption per image that is ``correct``, ``partial`` (one colour, shape or position
  swapped), ``unrelated`` (the caption of another image) or ``junk`` (ad-like text), at set rates, with the noise
  label kept in the row for evaluation.
- ``vqa`` (VQAv2): several questions per image with an answer and 10 "human" answers for the official accuracy.
- ``test``: 5 references per image (captioning, retrieval) and questions about the same images (VQA).

The package, one module per concern, each readable top to bottom: `scene` (the world, `Scene`, `ShapesConfig`,
`sample_scene`), `words` (the language, `tokenize`, `vocabulary`), `drawing` (`render`), `grammar` (captions and
their noise: `describe`, `references`, `corrupt`, `hard_negatives`), `parse` (`parse_caption`, `caption_errors`,
`check_caption`), `qa` (`questions`), `examples` (`make_example`: one image's scene and rows), `patches`
(`labelled_scenes`, `patch_labels`: the world's ImageNet), `dataset` (`generate`; its docstring gives the on-disk
layout), `cli` (`blip data shapes`). Everything public is importable from `blip.data.shapes` itself.
"""

from blip.data.shapes.cli import cli_main
from blip.data.shapes.dataset import FORMAT_VERSION, generate
from blip.data.shapes.drawing import render, shape_map
from blip.data.shapes.examples import Example, image_path, make_example, scene_for
from blip.data.shapes.grammar import NEGATIVE_SWAPS, corrupt, describe, hard_negatives, junk, references, swap_attribute
from blip.data.shapes.parse import Mention, ParsedCaption, caption_errors, check_caption, parse_caption
from blip.data.shapes.patches import MIN_COVER, PATCH_LABELS, labelled_scenes, patch_labels
from blip.data.shapes.qa import QA, questions
from blip.data.shapes.scene import (
    BACKGROUNDS,
    KINDS,
    NOISE_KINDS,
    PARTIAL_ATTRIBUTES,
    POSITIONS,
    SHAPE_COLORS,
    SIZES,
    SPLITS,
    Scene,
    Shape,
    ShapesConfig,
    sample_scene,
)
from blip.data.shapes.words import (
    ANSWER_LIST,
    ANSWER_SYNONYMS,
    COUNT_WORDS,
    JUNK_PHRASES,
    POSITION_PHRASES,
    SIZE_WORDS,
    tokenize,
    vocabulary,
)

__all__ = [
    "NEGATIVE_SWAPS",
    "ANSWER_LIST",
    "ANSWER_SYNONYMS",
    "BACKGROUNDS",
    "COUNT_WORDS",
    "FORMAT_VERSION",
    "JUNK_PHRASES",
    "KINDS",
    "MIN_COVER",
    "PATCH_LABELS",
    "NOISE_KINDS",
    "PARTIAL_ATTRIBUTES",
    "POSITIONS",
    "POSITION_PHRASES",
    "QA",
    "SHAPE_COLORS",
    "SIZES",
    "SIZE_WORDS",
    "SPLITS",
    "Example",
    "Mention",
    "ParsedCaption",
    "Scene",
    "Shape",
    "ShapesConfig",
    "caption_errors",
    "check_caption",
    "cli_main",
    "corrupt",
    "hard_negatives",
    "describe",
    "generate",
    "image_path",
    "junk",
    "labelled_scenes",
    "patch_labels",
    "make_example",
    "parse_caption",
    "questions",
    "references",
    "render",
    "shape_map",
    "sample_scene",
    "scene_for",
    "swap_attribute",
    "tokenize",
    "vocabulary",
]
