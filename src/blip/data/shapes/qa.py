"""Questions about a scene with their answers and 10 simulated human answers (VQAv2-style)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from blip.data.shapes.scene import KINDS, SHAPE_COLORS, Scene
from blip.data.shapes.words import ANSWER_GROUPS, ANSWER_SYNONYMS, article


@dataclass(frozen=True)
class QA:
    """A question about a scene with its canonical answer and 10 simulated human answers."""

    question: str
    answer: str
    answers: tuple[str, ...]  # 10 human answers, mostly `answer`
    answer_type: str  # VQAv2 types: "yes/no", "number", "other"
    question_type: str  # e.g. "what color is the", "how many"


def _human_answers(answer: str, group: str, rng: random.Random, noise: float) -> tuple[str, ...]:
    """10 annotator answers: mostly the canonical one, a few synonyms or mistakes (never more than 4 of 10)."""
    answers = [answer] * 10
    n_off = min(4, sum(rng.random() < noise for _ in range(10)))
    for slot in rng.sample(range(10), n_off):
        if answer in ANSWER_SYNONYMS and rng.random() < 0.5:
            answers[slot] = ANSWER_SYNONYMS[answer]
        else:
            answers[slot] = rng.choice([a for a in ANSWER_GROUPS[group] if a != answer])
    return tuple(answers)


def _candidate_questions(scene: Scene, rng: random.Random) -> dict[str, list[tuple[str, str, str]]]:
    """Per question type, the (question, answer, answer group) pairs that can be asked about this scene."""
    absent_kinds = [k for k in KINDS if scene.find(kind=k) is None]
    c: dict[str, list[tuple[str, str, str]]] = {
        "what color is the": [(f"what color is the {s.kind}?", s.color, "color") for s in scene.shapes],
        "what shape is": [(f"what shape is {s.color}?", s.kind, "shape") for s in scene.shapes],
        "where is the": [(f"where is the {s.kind}?", s.position, "position") for s in scene.shapes],
        "what size is the": [(f"what size is the {s.kind}?", s.size, "size") for s in scene.shapes],
        "how many": [("how many shapes are there?", str(len(scene.shapes)), "number")],
        "what color is the background": [("what color is the background?", scene.background, "background")],
        "is there a": [],
    }
    present = rng.choice(scene.shapes)
    if absent_kinds and rng.random() < 0.5:
        c["is there a"].append((f"is there a {rng.choice(absent_kinds)}?", "no", "yes/no"))
    else:
        c["is there a"].append((f"is there a {present.kind}?", "yes", "yes/no"))
    # A colour-kind pair: the true one, or the right kind with a wrong colour (a hard negative).
    s = rng.choice(scene.shapes)
    if rng.random() < 0.5:
        c["is there a"].append((f"is there {article(s.color)} {s.color} {s.kind}?", "yes", "yes/no"))
    else:
        wrong = rng.choice([col for col in SHAPE_COLORS if col != s.color])
        c["is there a"].append((f"is there {article(wrong)} {wrong} {s.kind}?", "no", "yes/no"))
    return c


def questions(scene: Scene, rng: random.Random, n: int = 5, *, human_noise: float = 0.2) -> list[QA]:
    """n distinct questions about the scene, spread over question types, with answers and 10 human answers."""
    candidates = _candidate_questions(scene, rng)
    types = [t for t in candidates if candidates[t]]
    rng.shuffle(types)
    for t in types:
        rng.shuffle(candidates[t])
    out: list[QA] = []
    while len(out) < n and any(candidates[t] for t in types):
        for t in types:
            if candidates[t] and len(out) < n:
                question, answer, group = candidates[t].pop()
                answer_type = group if group in ("yes/no", "number") else "other"
                out.append(QA(question, answer, _human_answers(answer, group, rng, human_noise), answer_type, t))
    return out
