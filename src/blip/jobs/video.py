"""Video collections in batch jobs: `blip batch embed --input videos/` embeds each video (the normalised mean of its
sampled frames' projected [CLS], `blip.tasks.video`) and builds an index that `blip retrieve` and `/v1/retrieve`
search like an image index (ITC top-k, then ITM over each hit's concatenated frames).

- `plan_media`: what the input holds. ``--media auto`` (the default) makes an embed job a video job when a folder holds
  no images but files with video extensions (`blip.video.VIDEO_EXTENSIONS`), or when every path of a manifest ends in
  one; ``--media video`` says so (a folder is then searched for video extensions unless ``--extensions`` names
  others). Only `embed` takes videos.
- `VideoRowRunner`: the embed runner for videos: each row's frames are decoded and sampled in the prefetch threads
  (`read_video`); a video that cannot be read fails its row with the reason, the job goes on.

A video job's description (hence its fingerprint) records ``"media": "video"`` and ``num_frames``; image jobs' do
not change.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from blip.data.webdataset import IMAGE_EXTENSIONS, TAR_PREFIX
from blip.jobs.prefetch import BatchDecoder, Decoded, decode_key
from blip.jobs.runner import RowRunner, TaskOptions
from blip.jobs.sources import InputError, InputOptions, InputPlan, Row, RowError, plan_input, read_bytes
from blip.video import VIDEO_EXTENSIONS, VideoDecodeError, import_av, read_frames

if TYPE_CHECKING:
    from blip.api import Blip

MEDIA = ("auto", "image", "video")
MAX_JOB_FRAMES = 64  # frames per video in a job (each frame is a ViT pass)


def _is_video_path(source: str) -> bool:
    if source.startswith(TAR_PREFIX):
        return False
    path = source.split("?", 1)[0].split("#", 1)[0]
    return path.rsplit(".", 1)[-1].lower() in VIDEO_EXTENSIONS if "." in path.rsplit("/", 1)[-1] else False


def plan_media(spec: str, task: str, inputs: InputOptions, media: str = "auto") -> tuple[InputPlan, str]:
    """(the rows of `spec`, "image" or "video"): see the module docstring for how ``auto`` decides."""
    if media not in MEDIA:
        raise InputError(f"--media must be one of {', '.join(MEDIA)}, got {media!r}")
    default_extensions = tuple(inputs.extensions) == tuple(IMAGE_EXTENSIONS)
    as_video = dataclasses.replace(inputs, extensions=VIDEO_EXTENSIONS) if default_extensions else inputs
    if media == "video":
        if task != "embed":
            raise InputError(f"--media video: only `blip batch embed` takes videos, not {task}")
        return plan_input(spec, task, as_video), "video"
    plan = plan_input(spec, task, inputs)
    if media == "image" or task != "embed":
        return plan, "image"
    if plan.kind == "folder":
        if plan.rows or not default_extensions:
            return plan, "image"
        videos = plan_input(spec, task, as_video)
        return (videos, "video") if videos.rows else (plan, "image")
    sources = [row.source for row in plan.rows if row.source and not row.problem]
    if sources and all(_is_video_path(s) for s in sources):
        return plan, "video"
    return plan, "image"


def read_video(row: Row, image_size: int | None, num_frames: int) -> list[Image.Image]:
    """A row's video as `num_frames` sampled RGB frames (resized to the model's square input). Raises `RowError`."""
    if row.problem:
        raise RowError(row.problem)
    if not row.source:
        raise RowError("no video")
    data: Any = read_bytes(row.source) if row.source.startswith((TAR_PREFIX, "http://", "https://")) else row.source
    try:
        return read_frames(data, num_frames, size=image_size, name=row.id)
    except VideoDecodeError as e:
        message, prefix = str(e), f"{row.id}: "
        raise RowError(message[len(prefix) :] if message.startswith(prefix) else message) from e


def check_video_job(num_frames: int) -> None:
    """Before anything is read: PyAV is there and the frame count is sane."""
    import_av()
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_JOB_FRAMES:
        raise ValueError(f"--frames must be between 1 and {MAX_JOB_FRAMES}, got {num_frames}")


@dataclasses.dataclass(frozen=True)
class VideoFrames(BatchDecoder):
    """Decodes a row's video into its sampled frames (`read_video`, resized to `image_size`); a batch's videos stay
    lists of PIL frames (`size` is None: nothing is stacked into one pixel tensor)."""

    size: int | None = dataclasses.field(default=None, init=False)
    image_size: int | None = None
    num_frames: int = 8

    def load(self, row: Row) -> list[Image.Image]:  # type: ignore[override]
        return read_video(row, self.image_size, self.num_frames)


class VideoRowRunner(RowRunner):
    """`blip batch embed` over videos: one L2-normalised ITC feature per video (`blip.tasks.video`)."""

    def __init__(self, blip: Blip, num_frames: int):
        from blip.tasks.video import check_video_model

        check_video_model(blip)
        super().__init__(blip, "embed", TaskOptions())
        self.num_frames = num_frames

    def batch_decoder(self) -> VideoFrames:
        return VideoFrames(self.image_size, self.num_frames)

    def _infer(self, rows: list[Row], decoded: Decoded) -> list[Any]:
        from blip.tasks.video import video_embeddings

        videos = [decoded.images[decode_key(row)] for row in rows]
        feats = video_embeddings(self.blip, videos).numpy().astype(np.float32, copy=False)  # type: ignore[arg-type]
        return list(feats)
