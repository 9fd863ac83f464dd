"""Video decoding for the zero-shot video tasks (`Blip.embed_videos`, `match_video`, `answer_video`, video indexes).

A video is read with PyAV (FFmpeg), the optional ``[video]`` extra, imported only when a video is opened. `read_frames`
returns N frames sampled uniformly, as 8-bit RGB PIL images that then take exactly the image path's preprocessing
(`blip.transforms.ImageTransform`: bicubic resize to the model's square, /255, mean/std). There is no temporal
modelling: the tasks run the ViT on each frame (docs/preprocessing.md#video).

Frame sampling (`sample_indices`): the video's T frames (in presentation order) are cut into N equal segments and the
frame at each segment's midpoint is taken: frame ``floor((2k + 1) * T / (2N))`` for k = 0..N-1. Deterministic, evenly
spread, never the very first or last frame of a long video; with T < N frames repeat (each segment is shorter than a
frame), so a one-frame video gives that frame N times. T is the number of packets of the video stream, read without
decoding; if decoding then yields fewer frames (a damaged tail), the indices are recomputed from the frames that
decoded. Rotation metadata is not applied.

Bounds (`VideoLimits`), each refused in one line naming the file before the work it would cost: file size, frames per
second x duration (frame count), seconds, pixels per frame. Every failure (missing, empty, not a video, no video
stream, codec this FFmpeg build cannot decode, zero frames, corrupt data) raises `VideoDecodeError`, a subclass of
`blip.transforms.ImageDecodeError`, so every caller that reports a bad image reports a bad video the same way (a batch
job fails that row with the reason).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from blip.transforms import ImageDecodeError, file_size, to_rgb

# File extensions taken as videos (folder inputs of `blip batch embed`, and telling videos from images in manifests).
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "m4v", "mov", "webm", "mkv", "avi", "mpg", "mpeg", "ogv", "wmv", "flv")
INSTALL_HINT = "pip install 'blip-vl[video]'"

VideoSource = str | os.PathLike | bytes | bytearray | memoryview | Sequence[Image.Image]


class VideoDecodeError(ImageDecodeError):
    """A video could not be read: the message starts with the video's name and gives the reason."""


class VideoUnavailableError(RuntimeError):
    """PyAV is not installed."""


@dataclass(frozen=True)
class VideoLimits:
    """What a video may cost before it is refused."""

    max_bytes: int = 2 << 30  # file size (2 GiB)
    max_frames: int = 200_000  # frames in the video stream (about 1 h 50 min at 30 fps)
    max_seconds: float = 4 * 3600.0  # duration, when the container states it
    max_pixels: int = 4096 * 4096  # per frame (4K UHD is 8.3 MP)


DEFAULT_LIMITS = VideoLimits()


def import_av() -> Any:
    """The `av` module, or one line saying how to install it."""
    try:
        import av
    except ImportError as e:
        raise VideoUnavailableError(f"reading videos needs PyAV: {INSTALL_HINT}") from e
    return av


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The frames to take from a video of `total` frames: segment midpoints, ``floor((2k + 1) * total / (2 n))``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total < 1:
        raise ValueError("a video with no frames has nothing to sample")
    return [((2 * k + 1) * total) // (2 * num_frames) for k in range(num_frames)]


def video_name(source: Any, name: str | None = None) -> str:
    if name:
        return name
    return str(source) if isinstance(source, str | os.PathLike) else "video"


def is_frame_list(source: Any) -> bool:
    """Whether `source` is a video given as its decoded frames (a non-empty list or tuple of PIL images)."""
    return isinstance(source, list | tuple) and len(source) > 0 and all(isinstance(f, Image.Image) for f in source)


def read_frames(
    source: VideoSource,
    num_frames: int,
    *,
    size: int | None = None,
    name: str | None = None,
    limits: VideoLimits = DEFAULT_LIMITS,
) -> list[Image.Image]:
    """`num_frames` frames of `source` sampled uniformly (`sample_indices`), as RGB PIL images (`size`: resized to
    size x size as `ImageTransform` does, so the full-size frames live only for the decode).

    `source`: a path, the bytes of a video file, or the video's frames (a list of PIL images, sampled the same way).
    Raises `VideoDecodeError` naming the video and the problem."""
    name = video_name(source, name)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(source, list | tuple):
        if not is_frame_list(source):
            raise VideoDecodeError(f"{name}: a video given as frames must be a non-empty list of PIL images")
        return [to_rgb(source[i], name=f"{name} frame {i}", size=size) for i in sample_indices(len(source), num_frames)]
    video = _Source(source, name, limits)
    av = import_av()
    try:
        total = _count_frames(video, name, limits)
        wanted = sample_indices(total, num_frames)
        frames, decoded = _decode_at(video, wanted, name, size)
        if len(frames) < len(set(wanted)):  # fewer frames decoded than packets counted: sample what there is
            if decoded == 0:
                raise VideoDecodeError(f"{name}: no frame could be decoded ({total} packets of corrupt video data)")
            wanted = sample_indices(decoded, num_frames)
            frames, _ = _decode_at(video, wanted, name, size)
    except VideoDecodeError:
        raise
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{name}: corrupt video data, decoding failed ({_ffmpeg_reason(e)})") from e
    except MemoryError as e:
        raise VideoDecodeError(f"{name}: out of memory while decoding") from e
    except (OSError, ValueError, RuntimeError) as e:
        raise VideoDecodeError(f"{name}: cannot decode the video ({type(e).__name__}: {e})") from e
    return [frames[i] for i in wanted]


def _ffmpeg_reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return str(text).split(":")[0].strip() or type(e).__name__


class _Source:
    """A video file or its bytes, checked for size; `open()` opens it afresh for each pass."""

    def __init__(self, source: Any, name: str, limits: VideoLimits):
        self.name = name
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            if not data:
                raise VideoDecodeError(f"{name}: empty data (0 bytes)")
            if len(data) > limits.max_bytes:
                raise VideoDecodeError(f"{name}: {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
            self.data: bytes | None = data
            self.path: str | None = None
        elif isinstance(source, str | os.PathLike):
            path = Path(source).expanduser()
            size = file_size(path, name, "a video file", VideoDecodeError)
            if size > limits.max_bytes:
                raise VideoDecodeError(f"{name}: {size} bytes, over the limit of {limits.max_bytes} bytes")
            self.data, self.path = None, str(path)
        else:
            raise TypeError(
                f"{name}: expected a video path, the bytes of a video file or a list of PIL frames, "
                f"got {type(source).__name__}"
            )

    def open(self) -> Any:
        av = import_av()
        try:
            return av.open(io.BytesIO(self.data) if self.data is not None else self.path, mode="r")
        except av.error.FFmpegError as e:
            reason = _ffmpeg_reason(e)
            raise VideoDecodeError(
                f"{self.name}: not a video FFmpeg can open: corrupt, truncated or not a video file ({reason})"
            ) from e


def _video_stream(container: Any, name: str) -> Any:
    streams = container.streams.video
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(f"{name}: no video stream (streams: {', '.join(kinds)})")
    stream = streams[0]
    if stream.codec_context is None:
        codec = getattr(getattr(stream, "codec", None), "name", None) or "unknown"
        raise VideoDecodeError(f"{name}: video codec {codec!r} is not supported by this FFmpeg build")
    return stream


def _count_frames(source: _Source, name: str, limits: VideoLimits) -> int:
    """The video stream's frame count (its packets, demuxed without decoding), after the cheap checks."""
    with source.open() as container:
        stream = _video_stream(container, name)
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width * height > limits.max_pixels:
            raise VideoDecodeError(
                f"{name}: frames are {width}x{height} = {width * height} pixels, over the limit of "
                f"{limits.max_pixels} per frame"
            )
        seconds = container.duration / 1_000_000 if container.duration else None
        if seconds is not None and seconds > limits.max_seconds:
            raise VideoDecodeError(f"{name}: {seconds:.0f} s long, over the limit of {limits.max_seconds:.0f} s")
        stated = int(stream.frames or 0)
        if stated > limits.max_frames:
            raise VideoDecodeError(f"{name}: {stated} frames, over the limit of {limits.max_frames}")
        total = 0
        for packet in container.demux(stream):
            if packet.size:
                total += 1
                if total > limits.max_frames:
                    raise VideoDecodeError(f"{name}: more than {limits.max_frames} frames, over the limit")
    if total == 0:
        raise VideoDecodeError(f"{name}: the video stream has no frames")
    return total


def _decode_at(source: _Source, wanted: list[int], name: str, size: int | None) -> tuple[dict[int, Image.Image], int]:
    """({index: RGB frame} for the distinct `wanted` indices, frames decoded), decoding up to the last wanted one."""
    targets = set(wanted)
    last = max(targets)
    out: dict[int, Image.Image] = {}
    index = -1
    with source.open() as container:
        stream = _video_stream(container, name)
        for frame in container.decode(stream):
            index += 1
            if index in targets:
                out[index] = to_rgb(frame.to_image(), name=f"{name} frame {index}", size=size)
            if index >= last:
                break
    return out, index + 1


# ---------------------------------------------------------------------------------------------------------------------
# Writing (the synthetic shapes-world clips, tests)

# Encoders by container, best first: H.264 where the wheel has libx264, else MPEG-4 part 2 (FFmpeg's own, always built).
ENCODERS: dict[str, tuple[str, ...]] = {
    "mp4": ("libx264", "mpeg4"),
    "mkv": ("libx264", "mpeg4"),
    "mov": ("libx264", "mpeg4"),
    "webm": ("libvpx-vp9", "libvpx"),
    "avi": ("mpeg4",),
}


def pick_encoder(extension: str) -> str:
    """The first encoder of `ENCODERS[extension]` this PyAV build has."""
    av = import_av()
    choices = ENCODERS.get(extension.lower().lstrip("."))
    if choices is None:
        raise ValueError(f"cannot write .{extension} videos: use one of {', '.join('.' + e for e in ENCODERS)}")
    for codec in choices:
        try:
            av.codec.Codec(codec, "w")
        except Exception:  # noqa: BLE001 - not in this build (UnknownCodecError and friends)
            continue
        return codec
    raise VideoUnavailableError(f"this PyAV build has none of the encoders {', '.join(choices)} for .{extension}")


def write_video(
    path: str | os.PathLike,
    frames: Sequence[Image.Image],
    *,
    fps: int = 10,
    quality: int = 18,
    codec: str | None = None,
) -> str:
    """Encode RGB frames (all of one even size) into `path` (.mp4/.mkv/.mov: H.264, .webm: VP9, .avi: MPEG-4 part 2;
    `codec` overrides). `quality`: the constant-rate factor (lower is better; 0 is lossless for H.264; MPEG-4 part 2
    gets a bit rate that grows as it falls).
    Returns the codec used."""
    av = import_av()
    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"frame size {width}x{height}: width and height must be even (4:2:0 chroma)")
    codec = codec or pick_encoder(path.suffix)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec in ("libx264", "libvpx-vp9", "libvpx"):
            stream.options = {"crf": str(quality), **({"b": "0"} if codec.startswith("libvpx") else {})}
        else:  # MPEG-4 part 2 has no constant-quality option here: a bit rate ample for small frames
            stream.bit_rate = max(200_000, width * height * fps * 4 * 18 // max(quality, 1))
        for i, image in enumerate(frames):
            if image.size != (width, height):
                raise ValueError(f"frame {i} is {image.size[0]}x{image.size[1]}, not {width}x{height}")
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec
