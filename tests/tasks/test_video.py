"""Zero-shot video through the Python API (docs/preprocessing.md#video): frames sampled at segment midpoints,
exactly and repeatably; the video embedding is the normalised mean of the frames' projected [CLS] (computed here
through the image path); ITM and VQA over the concatenated frame tokens equal the image tasks for a one-frame video;
broken files fail in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blip
from blip.tasks.common import MAX_TEXT_TOKENS
from blip.video import VideoDecodeError, VideoLimits, VideoUnavailableError, import_av, read_frames, sample_indices
from oracle import TinySpec
from video_helpers import frame_index, make_bad_videos, write_colour_clip, write_index_clip

RETRIEVAL = TinySpec(kind="retrieval", seed=95)
TEXTS = ["a red square", "a blue circle on the left", "two shapes"]


@pytest.fixture(scope="module")
def retriever(hf_checkpoints) -> blip.Blip:
    return blip.load(hf_checkpoints(RETRIEVAL))


def test_sampling_rule_is_segment_midpoints():
    assert sample_indices(37, 8) == [2, 6, 11, 16, 20, 25, 30, 34]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(16, 4) == [2, 6, 10, 14]
    assert sample_indices(1, 8) == [0] * 8  # a one-frame video: that frame N times
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(1000, 1) == [500]
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(10, 0)


@pytest.mark.parametrize("extension", ["mp4", "webm", "avi"])
def test_frames_come_back_exactly(tmp_path, extension):
    """A clip whose frames show their own index: exactly frames floor((2k+1) T / 2N) come back, every time, from
    the file, its bytes, or its frames given as a list."""
    path = write_index_clip(tmp_path / f"count.{extension}", 37)
    frames = read_frames(path, 8)
    assert [frame_index(f) for f in frames] == [2, 6, 11, 16, 20, 25, 30, 34]
    assert all(f.mode == "RGB" and f.size == (64, 32) for f in frames)
    again = read_frames(path.read_bytes(), 8)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, again))
    assert [frame_index(f) for f in read_frames(path, 16)] == sample_indices(37, 16)
    resized = read_frames(path, 3, size=48)
    assert [f.size for f in resized] == [(48, 48)] * 3
    all_frames = read_frames(path, 37)
    assert [frame_index(f) for f in all_frames] == list(range(37))
    assert [frame_index(f) for f in read_frames(all_frames, 8)] == [2, 6, 11, 16, 20, 25, 30, 34]


def test_short_video_repeats_frames(tmp_path):
    path = write_index_clip(tmp_path / "three.mp4", 3)
    assert [frame_index(f) for f in read_frames(path, 8)] == sample_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_broken_videos_fail_in_one_line(tmp_path):
    for name, fragment in make_bad_videos(tmp_path).items():
        with pytest.raises(VideoDecodeError, match=fragment) as info:
            read_frames(tmp_path / name, 4)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
    with pytest.raises(VideoDecodeError, match="cannot read file"):
        read_frames(tmp_path / "missing.mp4", 4)
    with pytest.raises(VideoDecodeError, match="is a directory"):
        read_frames(tmp_path, 4)
    with pytest.raises(VideoDecodeError, match="empty data"):
        read_frames(b"", 4)


def test_limits_refuse_before_decoding(tmp_path):
    path = write_index_clip(tmp_path / "count.mp4", 20)
    with pytest.raises(VideoDecodeError, match="over the limit of 1000 per frame"):
        read_frames(path, 4, limits=VideoLimits(max_pixels=1000))
    with pytest.raises(VideoDecodeError, match="over the limit"):
        read_frames(path, 4, limits=VideoLimits(max_frames=10))
    with pytest.raises(VideoDecodeError, match="over the limit of 100 bytes"):
        read_frames(path, 4, limits=VideoLimits(max_bytes=100))
    with pytest.raises(VideoDecodeError, match="over the limit of 1 s"):
        read_frames(path, 4, limits=VideoLimits(max_seconds=1.0))  # 20 frames at 10 fps: 2 s


def test_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoUnavailableError, match=r"pip install 'blip-vl\[video\]'"):
        import_av()


def _reference_frames(path, indices, size):
    """The frames at `indices`, decoded here with PyAV directly (not through blip.video), resized as images are."""
    import av

    with av.open(str(path)) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    return [decoded[i].resize((size, size), 3) for i in indices]


def test_video_embedding_is_normalised_mean_of_frame_projections(retriever, tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (240, 240, 240)] * 2
    path = write_colour_clip(tmp_path / "colours.mp4", colours)
    got = retriever.embed_videos(str(path), num_frames=8)
    assert got.shape == (1, retriever.config.embed_dim)

    # the image path: preprocessing, ViT, vision_proj of [CLS] per frame; the mean, then one L2 normalisation
    frames = _reference_frames(path, sample_indices(len(colours), 8), retriever.transform.image_size)
    model = retriever.model
    with torch.no_grad():
        cls = model.encode_image(retriever.transform(frames))[:, 0]
        expected = F.normalize(model.vision_proj(cls).mean(0), dim=-1)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    # the definition matters: the mean of the frames' *normalised* image features points elsewhere
    per_image = retriever.embed_images(frames)
    assert not torch.allclose(got[0], F.normalize(per_image.mean(0), dim=-1), atol=1e-4)

    # several videos in one call, each its own; a video given as frames is sampled the same way
    other = write_colour_clip(tmp_path / "other.webm", colours[::-1])
    both = retriever.embed_videos([path, other], num_frames=8)
    torch.testing.assert_close(both[0], got[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], retriever.embed_videos(other)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.norm(both, dim=1), torch.ones(2))


@pytest.mark.parametrize("num_frames", [1, 8])
def test_one_frame_video_matches_like_its_image(retriever, tmp_path, num_frames):
    """ITM over the concatenated memory of N copies of one frame = ITM of that frame as an image."""
    path = write_colour_clip(tmp_path / "one.mp4", [(200, 40, 40)])
    frame = read_frames(path, 1)[0]
    got = retriever.match_video(path, TEXTS, num_frames=num_frames)
    want = retriever.match(frame, TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_concatenated_memory_is_all_frames_tokens(retriever, tmp_path):
    """Several frames: the text cross-attends to [1, N * (1 + P), D], frame 0's tokens first."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    path = write_colour_clip(tmp_path / "four.avi", colours)
    frames = read_frames(path, 4, size=retriever.transform.image_size)
    model = retriever.model
    with torch.no_grad():
        tokens = model.encode_image(retriever.transform(frames))  # [4, 1 + P, D]
        memory = torch.cat(list(tokens), dim=0)[None]  # [1, 4 * (1 + P), D]
        ids, mask = retriever.tokenizer(TEXTS, max_length=MAX_TEXT_TOKENS)
        states = model.encode_multimodal(ids, mask, memory.expand(len(TEXTS), -1, -1))
        want = model.itm_logits(states).softmax(-1)[:, 1].tolist()
    assert memory.shape[1] == 4 * tokens.shape[1]
    np.testing.assert_allclose(retriever.match_video(path, TEXTS, num_frames=4), want, atol=1e-5)
    per_frame = [retriever.match(f, TEXTS) for f in frames]
    assert not np.allclose(want, per_frame[0], atol=1e-4)  # the other frames count


def test_one_frame_video_answers_like_its_image(answerer, tmp_path):
    path = write_colour_clip(tmp_path / "one.webm", [(30, 30, 200)])
    frame = read_frames(path, 1)[0]
    questions = ["what color is it?", "is there a square?"]
    got = answerer.answer_video(path, questions)  # 16 copies of the one frame
    want = answerer.answer(frame, questions)
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
    np.testing.assert_allclose([a.score for a in got], [a.score for a in want], atol=1e-4)
    ranked = answerer.answer_video(path, questions, num_frames=2, answers=["red", "blue", "yes", "no"])
    assert [a.text for a in ranked] == [
        a.text for a in answerer.answer(frame, questions, answers=["red", "blue", "yes", "no"])
    ]


def test_video_api_refuses_bad_calls(retriever, answerer, tmp_path):
    path = write_index_clip(tmp_path / "count.mp4", 5)
    with pytest.raises(ValueError, match="num_frames"):
        retriever.embed_videos(path, num_frames=0)
    with pytest.raises(ValueError, match="no videos"):
        retriever.embed_videos([])
    with pytest.raises(ValueError, match="text 1 is empty"):
        retriever.match_video(path, ["a square", " "])
    with pytest.raises(VideoDecodeError, match="missing.mp4: cannot read file"):
        retriever.match_video(tmp_path / "missing.mp4", "a square")
    with pytest.raises(ValueError, match="vqa"):
        retriever.answer_video(path, "what is it?")
    with pytest.raises(ValueError, match="itc"):
        answerer.embed_videos(path)
    with pytest.raises(ValueError, match="max_new_tokens"):
        answerer.answer_video(path, "what?", max_new_tokens=0)


def test_blip2_refuses_video(tmp_path):
    pytest.importorskip("transformers")
    from oracle_blip2 import Blip2Spec, build_blip2_checkpoint

    model = blip.load(build_blip2_checkpoint(tmp_path / "b2", Blip2Spec(kind="retrieval", seed=5)))
    path = write_index_clip(tmp_path / "count.mp4", 5)
    for call in (lambda: model.embed_videos(path), lambda: model.match_video(path, "a square")):
        with pytest.raises(ValueError, match="video tasks .* are for BLIP checkpoints"):
            call()


def test_embed_videos_takes_one_video_given_as_its_frames(retriever):
    """A list of PIL images is one video's frames (as `match_video` and `answer_video` take it), not a list of
    one-frame videos: a single PIL image is no video."""
    from PIL import Image

    frames = [Image.new("RGB", (40, 40), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    got = retriever.embed_videos(frames, num_frames=3)
    assert got.shape == (1, retriever.config.embed_dim)
    torch.testing.assert_close(got, retriever.embed_videos([frames], num_frames=3))
