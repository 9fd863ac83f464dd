"""Test videos: clips whose frames show their own index, and broken files of every kind a video reader meets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BITS = 8  # frame index written as 8 vertical stripes, white = 1, least significant bit on the left
STRIPE = 8


def index_frame(i: int, height: int = 32) -> Image.Image:
    """A frame showing the number `i` in binary: stripe b is white when bit b of i is set (survives lossy coding)."""
    pixels = np.zeros((height, BITS * STRIPE, 3), np.uint8)
    for b in range(BITS):
        if i >> b & 1:
            pixels[:, b * STRIPE : (b + 1) * STRIPE] = 255
    pixels[:, :, 2] = np.where(pixels[:, :, 0] > 0, 255, 40)  # a little colour so frames are not grey
    return Image.fromarray(pixels)


def frame_index(image: Image.Image) -> int:
    """The number an `index_frame` shows (read from each stripe's middle, away from the coding's edge blur)."""
    grey = np.asarray(image.convert("L").resize((BITS * STRIPE, 32)), np.float32)
    return sum(1 << b for b in range(BITS) if grey[:, b * STRIPE + 2 : (b + 1) * STRIPE - 2].mean() > 128)


def write_index_clip(path: Path, n: int, fps: int = 10) -> Path:
    from blip.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, [index_frame(i) for i in range(n)], fps=fps)
    return path


def write_colour_clip(path: Path, colours: list[tuple[int, int, int]], size: int = 32, fps: int = 10) -> Path:
    """Frames of noise around a colour each (ITM and embeddings differ from frame to frame)."""
    from blip.video import write_video

    rng = np.random.default_rng(len(colours))
    frames = []
    for colour in colours:
        noise = rng.integers(-50, 50, (size, size, 3))
        frames.append(Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps=fps)
    return path


def zero_frame_video(path: Path) -> Path:
    """An AVI holding a video stream with no frames in it."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # the header is written, no packet ever is
    return path


def audio_only(path: Path) -> Path:
    """A WAV file: a container FFmpeg reads, with an audio stream and no video."""
    import av

    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def corrupt_video(path: Path, good: Path) -> Path:
    """An AVI of `good`'s frames whose headers survive and whose frame data is scrambled: it opens, then fails to
    decode."""
    data = bytearray(good.read_bytes())
    start, end = len(data) // 20, len(data) * 19 // 20
    data[start:end] = np.random.default_rng(1).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


# name -> what its error must mention
BAD_VIDEOS = {
    "bad/corrupt.avi": "corrupt video data",
    "bad/truncated.mp4": "corrupt, truncated or not a video file",
    "bad/zero_frames.avi": "the video stream has no frames",
    "bad/not_a_video.mp4": "corrupt, truncated or not a video file",
    "bad/empty.webm": "empty file",
    "bad/sound.avi": "no video stream",
}


def make_bad_videos(root: Path) -> dict[str, str]:
    """Broken videos under `root/bad`; returns {relative name: fragment its error must contain}."""
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    corrupt_video(bad / "corrupt.avi", write_index_clip(bad / "source.avi", 30))
    (bad / "source.avi").unlink()
    mp4 = write_index_clip(bad / "source.mp4", 30).read_bytes()
    (bad / "source.mp4").unlink()
    (bad / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    zero_frame_video(bad / "zero_frames.avi")
    (bad / "not_a_video.mp4").write_text("this is a text file with a video name\n")
    (bad / "empty.webm").write_bytes(b"")
    audio_only(bad / "sound.wav").rename(bad / "sound.avi")  # a WAV named .avi: FFmpeg goes by the content
    return dict(BAD_VIDEOS)
