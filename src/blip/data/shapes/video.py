"""Shapes-world video: short clips of one event each, with captions and questions, written as real video files.

Events (`EVENTS`), on a plain background, drawn frame by frame with `blip.data.shapes.drawing.render`:

- ``move``: one shape travels from one side to the opposite one (left -> right, right -> left, top -> bottom,
  bottom -> top) at constant speed;
- ``recolor``: one shape stays at its position and changes colour at a frame in the middle third;
- ``appear``: one shape is there from the start; a second one appears at a frame in the middle third.

Captions use the image world's words where they exist ("a red circle", "on the left", "on a black background") plus a
few verbs ("moves", "turns", "appears"), so an image-pretrained model reads most of a caption; questions ask what only
the whole clip shows (where the shape goes, the colour at the end, what appears), answered with the world's answer
words (`blip.data.shapes.ANSWER_LIST`). No texture noise (it codes badly), saturated
colours (they survive 4:2:0 chroma): the decoded frames' colours stay within a few levels of the drawn ones.

`make_clip(seed, index)` is a pure function of its arguments; `generate_videos(out, n, seed=...)` writes
``out/videos/clip_NNNNN.<ext>`` (H.264 MP4 by default, `blip.video.write_video`) and ``out/videos.jsonl``, one row per
clip: ``{"id", "video", "caption", "event", "frames", "fps", "clip", "questions": [{"question", "answer"}]}``. That
manifest is a `blip batch embed` input as it is (its ``video`` column is read as a video).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from blip.data.shapes.drawing import render
from blip.data.shapes.scene import BACKGROUNDS, KINDS, POSITIONS, SHAPE_COLORS, SIZES, Scene, Shape, ShapesConfig
from blip.data.shapes.words import POSITION_PHRASES, article
from blip.io import atomic_write_bytes, jsonl_bytes

EVENTS: tuple[str, ...] = ("move", "recolor", "appear")
MOVES: dict[str, str] = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}  # start -> end
SIDES: dict[str, str] = {"left": "the left", "right": "the right", "top": "the top", "bottom": "the bottom"}
MANIFEST = "videos.jsonl"


@dataclass(frozen=True)
class VideoConfig:
    """How clips are drawn and written."""

    image_size: int = 64  # frame side, pixels (even: 4:2:0 chroma)
    num_frames: int = 16
    fps: int = 8
    extension: str = "mp4"  # mp4 / mkv (H.264), webm (VP9), avi (MPEG-4 part 2)
    quality: int = 18  # the encoder's constant-rate factor (`blip.video.write_video`)

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"image_size must be even and at least 16, got {self.image_size}")
        if self.num_frames < 3:
            raise ValueError(
                f"num_frames must be at least 3 (an event needs a before and an after), got {self.num_frames}"
            )

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(image_size=self.image_size, texture=False, jitter=0.0)


@dataclass(frozen=True)
class Clip:
    """One clip: its event and everything drawn. `shape` is the moving / recolouring / first shape; `other` the
    one that appears (appear) and `new_color` the colour turned to (recolor); `change_at` the first frame after the
    change (recolor, appear)."""

    event: str
    background: str
    shape: Shape
    end: str  # move: where the shape ends; otherwise its own position
    new_color: str | None = None
    other: Shape | None = None
    change_at: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _rng(seed: int, index: int, purpose: str) -> random.Random:
    return random.Random(f"blip.shapes.video/{seed}/{index}/{purpose}")


def sample_clip(rng: random.Random, cfg: VideoConfig = VideoConfig()) -> Clip:
    event = rng.choice(EVENTS)
    background = rng.choice(tuple(BACKGROUNDS))
    kind, other_kind = rng.sample(KINDS, 2)
    color, second_color = rng.sample(tuple(SHAPE_COLORS), 2)
    size = rng.choice(tuple(SIZES))
    change_at = rng.randint(cfg.num_frames // 3, 2 * cfg.num_frames // 3)
    if event == "move":
        start = rng.choice(tuple(MOVES))
        return Clip(event, background, Shape(kind, color, size, start), MOVES[start])
    if event == "recolor":
        position = rng.choice(tuple(POSITIONS))
        shape = Shape(kind, color, "large", position)
        return Clip(event, background, shape, position, new_color=second_color, change_at=change_at)
    first, second = rng.sample(tuple(POSITIONS), 2)
    other = Shape(other_kind, second_color, rng.choice(tuple(SIZES)), second)
    return Clip(event, background, Shape(kind, color, size, first), first, other=other, change_at=change_at)


def make_clip(seed: int, index: int, cfg: VideoConfig = VideoConfig()) -> Clip:
    """Clip `index` of the clips of `seed`."""
    return sample_clip(_rng(seed, index, "clip"), cfg)


def scenes(clip: Clip, cfg: VideoConfig = VideoConfig()) -> list[Scene]:
    """What each frame shows."""
    out = []
    n = cfg.num_frames
    for t in range(n):
        shape = clip.shape
        if clip.event == "move":
            (x0, y0), (x1, y1) = POSITIONS[shape.position], POSITIONS[clip.end]
            x, y = x0 + (x1 - x0) * t / (n - 1), y0 + (y1 - y0) * t / (n - 1)
            cx, cy = POSITIONS["center"]
            shape = dataclasses.replace(shape, position="center", offset=(x - cx, y - cy))
            drawn = (shape,)
        elif clip.event == "recolor":
            drawn = (dataclasses.replace(shape, color=clip.new_color) if t >= clip.change_at else shape,)
        else:
            assert clip.other is not None
            drawn = (shape, clip.other) if t >= clip.change_at else (shape,)
        out.append(Scene(clip.background, drawn))
    return out


def render_clip(clip: Clip, cfg: VideoConfig = VideoConfig()) -> list[Image.Image]:
    """The clip's frames, RGB, `cfg.image_size` square."""
    shapes_cfg = cfg.shapes_config()
    return [render(scene, shapes_cfg) for scene in scenes(clip, cfg)]


def _named(shape: Shape, color: str | None = None) -> str:
    words = [color or shape.color, shape.kind]
    return f"{article(words[0])} {' '.join(words)}"


def caption(clip: Clip) -> str:
    """The clip's caption."""
    on = f"on a {clip.background} background"
    if clip.event == "move":
        return f"{_named(clip.shape)} moves from {SIDES[clip.shape.position]} to {SIDES[clip.end]} {on}"
    where = POSITION_PHRASES[clip.shape.position][0]
    if clip.event == "recolor":
        return f"a {clip.shape.kind} {where} turns from {clip.shape.color} to {clip.new_color} {on}"
    assert clip.other is not None
    return f"{_named(clip.other)} appears {POSITION_PHRASES[clip.other.position][0]} next to {_named(clip.shape)} {on}"


def questions(clip: Clip) -> list[dict[str, str]]:
    """Questions only the whole clip answers, with their answers (shapes-world answer words)."""
    kind = clip.shape.kind
    if clip.event == "move":
        return [
            {"question": f"where does the {kind} move to?", "answer": clip.end},
            {"question": "what color is the moving shape?", "answer": clip.shape.color},
            {"question": "what shape is moving?", "answer": kind},
        ]
    if clip.event == "recolor":
        assert clip.new_color is not None
        return [
            {"question": f"what color is the {kind} at the end?", "answer": clip.new_color},
            {"question": f"what color is the {kind} at the start?", "answer": clip.shape.color},
            {"question": "what shape changes color?", "answer": kind},
        ]
    assert clip.other is not None
    return [
        {"question": "what shape appears?", "answer": clip.other.kind},
        {"question": "what color is the new shape?", "answer": clip.other.color},
        {"question": "how many shapes are there at the end?", "answer": "2"},
    ]


def clip_path(index: int, cfg: VideoConfig = VideoConfig()) -> str:
    return f"videos/clip_{index:05d}.{cfg.extension}"


def generate_videos(
    out_dir: str | Path, n: int, *, seed: int = 0, cfg: VideoConfig = VideoConfig()
) -> list[dict[str, Any]]:
    """Write `n` clips and ``videos.jsonl`` into `out_dir`; returns the manifest rows. Needs PyAV (``[video]``)."""
    from blip.video import write_video

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        clip = make_clip(seed, index, cfg)
        rel = clip_path(index, cfg)
        write_video(out / rel, render_clip(clip, cfg), fps=cfg.fps, quality=cfg.quality)
        rows.append(
            {
                "id": f"clip_{index:05d}",
                "video": rel,
                "caption": caption(clip),
                "event": clip.event,
                "frames": cfg.num_frames,
                "fps": cfg.fps,
                "clip": clip.to_dict(),
                "questions": questions(clip),
            }
        )
    atomic_write_bytes(out / MANIFEST, jsonl_bytes(rows))  # the manifest last: only whole clips are listed
    return rows


def cli_main(argv: list[str] | None = None, prog: str = "blip data shapes-video") -> int:
    """`blip data shapes-video --out DIR --n N`: write clips and their manifest. Returns the exit code."""
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(prog=prog, description="Generate synthetic shapes-world video clips (needs PyAV).")
    p.add_argument("--out", required=True, help="output folder (videos/ and videos.jsonl)")
    p.add_argument("--n", type=int, default=100, help="clips (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=VideoConfig.num_frames, help="frames per clip")
    p.add_argument("--fps", type=int, default=VideoConfig.fps)
    p.add_argument("--image-size", type=int, default=VideoConfig.image_size)
    p.add_argument("--format", dest="extension", choices=["mp4", "mkv", "webm", "avi"], default="mp4")
    a = p.parse_args(argv)
    started = time.perf_counter()
    try:
        cfg = VideoConfig(image_size=a.image_size, num_frames=a.frames, fps=a.fps, extension=a.extension)
        rows = generate_videos(a.out, a.n, seed=a.seed, cfg=cfg)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    events = {e: sum(r["event"] == e for r in rows) for e in EVENTS}
    print(f"wrote {len(rows)} clips to {a.out} in {time.perf_counter() - started:.1f}s: {json.dumps(events)}")
    return 0
