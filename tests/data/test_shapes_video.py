"""Shapes-world clips: a pure function of the seed, written as real video files whose decoded frames still show the
event (which way the shape moves, its colour before and after, the shape that appears), with captions and questions
in the world's words."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blip.data.shapes import ANSWER_LIST, SHAPE_COLORS
from blip.data.shapes.video import EVENTS, VideoConfig, caption, generate_videos, make_clip, questions, render_clip
from blip.video import read_frames

N = 9


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return root, generate_videos(root, N, seed=3)


def _colour_mask(image, colour: str, tolerance: int = 40) -> np.ndarray:
    pixels = np.asarray(image, np.int16)
    return np.abs(pixels - np.array(SHAPE_COLORS[colour])).max(-1) < tolerance


def test_clips_are_a_pure_function_of_the_seed(clips, tmp_path):
    root, rows = clips
    assert make_clip(3, 4) == make_clip(3, 4) and make_clip(3, 4) != make_clip(4, 4)
    again = generate_videos(tmp_path, N, seed=3)
    assert again == rows
    assert (tmp_path / "videos.jsonl").read_text() == (root / "videos.jsonl").read_text()
    for row in rows[:3]:
        a, b = read_frames(root / row["video"], 16), read_frames(tmp_path / row["video"], 16)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert {r["event"] for r in generate_videos(tmp_path / "more", 30, seed=0)} == set(EVENTS)


def test_manifest_rows(clips):
    root, rows = clips
    for i, row in enumerate(rows):
        clip = make_clip(3, i)
        assert row["id"] == f"clip_{i:05d}" and (root / row["video"]).is_file()
        assert row["caption"] == caption(clip) and row["questions"] == questions(clip)
        assert row["event"] == clip.event and row["frames"] == 16
        assert all(q["answer"] in ANSWER_LIST for q in row["questions"])
        assert json.loads(json.dumps(row["clip"])) == row["clip"]


def test_decoded_frames_show_the_event(clips):
    """Every clip's event is still visible after H.264 coding: colours within tolerance of the drawn ones."""
    root, rows = clips
    for i, row in enumerate(rows):
        clip = make_clip(3, i)
        frames = read_frames(root / row["video"], 16)  # all 16 frames
        drawn = render_clip(clip)
        error = np.mean(
            [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() for a, b in zip(frames, drawn)]
        )
        assert error < 4, (row["id"], error)
        first, last = frames[0], frames[-1]
        if clip.event == "move":
            xs = [np.nonzero(_colour_mask(f, clip.shape.color))[1].mean() for f in (first, last)]
            ys = [np.nonzero(_colour_mask(f, clip.shape.color))[0].mean() for f in (first, last)]
            moved = {"right": xs[1] - xs[0], "left": xs[0] - xs[1], "bottom": ys[1] - ys[0], "top": ys[0] - ys[1]}
            direction = row["questions"][0]["answer"]
            assert moved[direction] > 30, (row["caption"], moved)  # most of the 64-pixel side
        elif clip.event == "recolor":
            assert _colour_mask(first, clip.shape.color).sum() > 50 and _colour_mask(first, clip.new_color).sum() == 0
            assert _colour_mask(last, clip.new_color).sum() > 50 and _colour_mask(last, clip.shape.color).sum() == 0
        else:
            assert clip.other is not None
            assert _colour_mask(first, clip.other.color).sum() == 0 and _colour_mask(last, clip.other.color).sum() > 20
            assert _colour_mask(first, clip.shape.color).sum() > 20


def test_config_and_cli(tmp_path, capsys):
    from blip.cli import main

    with pytest.raises(ValueError, match="even"):
        VideoConfig(image_size=33)
    assert main(["data", "shapes-video", "--out", str(tmp_path), "--n", "3", "--format", "webm", "--frames", "6"]) == 0
    assert "wrote 3 clips" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "videos.jsonl").read_text().splitlines()]
    assert [r["video"] for r in rows] == [f"videos/clip_{i:05d}.webm" for i in range(3)]
    assert len(read_frames(tmp_path / rows[0]["video"], 6)) == 6
