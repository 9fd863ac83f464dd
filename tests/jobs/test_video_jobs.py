"""`blip batch embed` over a folder (or manifest) of videos: one vector per video, equal to `Blip.embed_videos`;
broken videos fail their rows with the reason and the job goes on; a rerun resumes; the index records the media and
`blip retrieve` re-ranks its ITC top-k by ITM over each hit's concatenated frames (`Blip.match_video`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from jobs_helpers import read_errors, read_rows

import blip
from blip.jobs.cli import batch_main, retrieve_main
from blip.tasks.retrieval import load_collection_index, search_texts
from video_helpers import make_bad_videos, write_colour_clip

COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (140, 60, 180), (245, 140, 30), (25, 25, 25)]
QUERY = "a red circle moves to the right"


def _clips(root: Path) -> list[str]:
    """Seven short clips (each its own colours, 5-12 frames) in three containers, some in a subfolder."""
    names = []
    for i, colour in enumerate(COLOURS):
        rel = f"{'sub/' if i % 3 == 0 else ''}clip{i}.{('mp4', 'webm', 'avi')[i % 3]}"
        frames = [tuple((c + 30 * k * (j + 1)) % 256 for j, c in enumerate(colour)) for k in range(5 + i)]
        write_colour_clip(root / rel, frames)
        names.append(rel)
    return sorted(names)


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> tuple[Path, list[str], dict[str, str]]:
    root = tmp_path_factory.mktemp("videos")
    good = _clips(root)
    bad = make_bad_videos(root)
    (root / "notes.txt").write_text("not a video\n")
    return root, good, bad


@pytest.fixture(scope="module")
def embedded(retrieval_model, video_folder, tmp_path_factory) -> Path:
    folder, _, _ = video_folder
    out = tmp_path_factory.mktemp("video_index") / "out"
    argv = ["embed", "-m", str(retrieval_model), "-i", str(folder), "-o", str(out), "--batch-size", "3"]
    assert batch_main([*argv, "--shard-size", "4", "--workers", "2", "--no-progress"]) == 1  # failed rows
    return out


def test_embed_videos_folder(retrieval_model, video_folder, embedded, capsys):
    folder, good, bad = video_folder
    rows = read_rows(embedded)
    assert [r["image"] for r in rows] == good  # bad/* failed; notes.txt is not a video
    errors = {e["image"]: e["error"] for e in read_errors(embedded)}
    assert sorted(errors) == sorted(bad)
    for name, fragment in bad.items():
        assert fragment in errors[name] and "\n" not in errors[name], (name, errors[name])

    model = blip.load(retrieval_model)
    expected = model.embed_videos([folder / g for g in good], num_frames=8)
    collection = load_collection_index(embedded)
    np.testing.assert_allclose(np.asarray(collection.vectors), expected.numpy(), atol=1e-5)
    assert (collection.media, collection.meta["num_frames"], collection.meta["count"]) == ("video", 8, len(good))
    manifest = json.loads((embedded / "_manifest.json").read_text())
    assert manifest["job"]["input"]["media"] == "video" and manifest["index"]["media"] == "video"

    # a rerun of the same command finds the job done: nothing is embedded again
    before = (embedded / "index" / "vectors.npy").read_bytes()
    argv = ["embed", "-m", str(retrieval_model), "-i", str(folder), "-o", str(embedded), "--batch-size", "3"]
    assert batch_main([*argv, "--shard-size", "4", "--no-progress"]) == 1
    assert "resumed" in capsys.readouterr().err
    assert (embedded / "index" / "vectors.npy").read_bytes() == before


def test_retrieve_reranks_videos_by_itm_over_frames(retrieval_model, video_folder, embedded, capsys):
    folder, good, _ = video_folder
    assert retrieve_main(["--index", str(embedded), QUERY, "--top-k", "4", "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    hits = [json.loads(line) for line in captured.out.splitlines()]
    assert "7 videos" in captured.err

    model = blip.load(retrieval_model)
    sims = (model.embed_videos([folder / g for g in good]) @ model.embed_texts(QUERY).T)[:, 0]
    top4 = [good[i] for i in torch.topk(sims, 4).indices.tolist()]
    assert sorted(h["image"] for h in hits) == sorted(top4)  # the ITC top-4 ...
    itm = [model.match_video(folder / h["image"], QUERY)[0] for h in hits]
    assert [h["itm"] for h in hits] == pytest.approx(itm, abs=1e-5)  # ... scored over all 8 frames' tokens
    assert [h["itm"] for h in hits] == sorted(itm, reverse=True)  # ... and re-ranked by it
    assert [h["itc"] for h in hits] == pytest.approx([float(sims[good.index(h["image"])]) for h in hits], abs=1e-5)

    collection = load_collection_index(embedded)
    plain = search_texts(model, collection, [QUERY], top_k=4, rerank=False)[0]
    assert [h.image for h in plain] == top4 and all(h.itm is None for h in plain)


def test_video_manifest_and_media_flags(retrieval_model, video_folder, tmp_path, capsys):
    folder, good, _ = video_folder
    manifest = tmp_path / "clips.jsonl"
    lines = [{"id": f"v{i}", "video": str(folder / g), "caption": f"clip {i}"} for i, g in enumerate(good[:3])]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "m"
    argv = ["embed", "-m", str(retrieval_model), "-i", str(manifest), "-o", str(out)]
    assert batch_main([*argv, "--frames", "3", "--no-progress"]) == 0  # every path is a video: a video job
    collection = load_collection_index(out)
    assert [r["image"] for r in collection.rows] == ["v0", "v1", "v2"] and collection.meta["num_frames"] == 3
    model = blip.load(retrieval_model)
    want = model.embed_videos([folder / g for g in good[:3]], num_frames=3)
    np.testing.assert_allclose(np.asarray(collection.vectors), want.numpy(), atol=1e-5)

    base = ["embed", "-m", str(retrieval_model), "-i", str(folder), "--no-progress"]
    assert batch_main([*base, "-o", str(tmp_path / "i"), "--media", "image"]) == 2  # no images in a video folder
    assert "no images found" in capsys.readouterr().err
    assert batch_main([*base, "-o", str(tmp_path / "f"), "--frames", "0"]) == 2
    assert "--frames must be between 1 and 64" in capsys.readouterr().err
    caption = ["caption", "-m", str(retrieval_model), "-i", str(folder), "-o", str(tmp_path / "c"), "--media", "video"]
    with pytest.raises(SystemExit):  # only embed has --media
        batch_main(caption)


def test_interrupted_video_job_resumes_to_the_same_output(retrieval_model, video_folder, tmp_path, monkeypatch):
    """Stopped in the middle (Ctrl-C after two batches: a shard committed, another journaled in part), the same
    command finishes the job; the folder then equals an uninterrupted run's, row for row and byte for byte."""
    from jobs_helpers import assert_same_output

    from blip.jobs.video import VideoRowRunner

    folder, good, bad = video_folder
    args = ["embed", "-m", str(retrieval_model), "-i", str(folder), "--batch-size", "2", "--shard-size", "4"]
    args += ["--workers", "1", "--no-progress"]
    reference = tmp_path / "reference"
    assert batch_main([*args, "-o", str(reference)]) == 1

    calls = {"n": 0}
    infer = VideoRowRunner._infer

    def stop_after_two(self, rows, decoded):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return infer(self, rows, decoded)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(VideoRowRunner, "_infer", stop_after_two)
    assert batch_main([*args, "-o", str(out)]) == 130
    assert list(out.glob("_work/*.journal")) or list(out.glob("part-*"))  # something was kept
    monkeypatch.setattr(VideoRowRunner, "_infer", infer)
    assert batch_main([*args, "-o", str(out)]) == 1
    assert_same_output(out, reference)
    assert [r["image"] for r in read_rows(out)] == good
