"""WebDataset tar shards, read with the standard library's `tarfile`: shard patterns, samples, members by offset.

A shard is a tar whose members are grouped into samples by WebDataset's rule: the key of a member is its path up to
the first dot of the file name, the rest is its extension (``images/0001.seg.png`` -> key ``images/0001``, extension
``seg.png``), and a sample is a run of adjacent members with the same key. Member names are unique in a shard: a
repeated name (a second ``0001.png``, next to the first or later in the shard) makes that sample a duplicate, which
readers report instead of silently keeping one of the copies.

Used by training (`blip.train.datasets` streams samples), the batch jobs and CapFilt (`blip.jobs.sources` plans a row
per sample and reads each image later by its offset: ``tar://<path>#<offset>:<size>``).
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from blip.data.manifests import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
TEXT_EXTENSIONS = ("txt", "caption", "text")  # a sample's text member, in order of preference
TAR_PREFIX = "tar://"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


class ShardError(DataError):
    """A tar shard (or a member of one) that cannot be read."""


# --- shard patterns ----------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the shell (and WebDataset) does it: ``{000..009}`` (zero padding kept) and ``{a,b}``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    ranged = _RANGE.fullmatch(match.group(0))
    if ranged:
        lo, hi = ranged.group(1), ranged.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        choices = ["{" + body + "}"]
        head, tail = pattern[: match.end()], pattern[match.end() :]
        return [head + rest for rest in expand_braces(tail)]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + c + tail) for c in choices))


def is_shard_pattern(spec: str) -> bool:
    """Whether `spec` names tar shards rather than one manifest: a .tar path, a glob or a brace pattern."""
    return spec.endswith(".tar") or any(c in spec for c in "*?[") or _RANGE.search(spec) is not None


def expand_shards(spec: str) -> list[str]:
    """The paths `spec` names: space-separated parts, each brace-expanded, then globbed (sorted) where it has wildcards;
    a part without wildcards is kept as written (whether it exists is the reader's business)."""
    paths: list[str] = []
    for part in spec.split():
        for expanded in expand_braces(part):
            expanded = os.path.expanduser(expanded)
            paths += sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
    return paths


# --- samples -----------------------------------------------------------------------------------------------------


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # where its data starts in the (uncompressed) tar
    size: int


@dataclass
class TarSample:
    key: str
    members: dict[str, TarMember] = field(default_factory=dict)  # extension -> member, in tar order
    data: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes, for the members that were read
    duplicates: list[str] = field(default_factory=list)  # member names already seen in this shard

    def image_extension(self, extensions: tuple[str, ...] | set[str] = IMAGE_EXTENSIONS) -> str | None:
        """The first member (in tar order) whose extension is an image extension."""
        return next((ext for ext in self.members if ext in extensions), None)

    def text_extension(self) -> str | None:
        return next((ext for ext in TEXT_EXTENSIONS if ext in self.members), None)

    def duplicate_problem(self, shard: str) -> str | None:
        """Why this sample cannot be used (its member names repeat), or None."""
        if not self.duplicates:
            return None
        names = ", ".join(dict.fromkeys(self.duplicates))
        return f"duplicate member name in {shard}: {names} (a sample's members must be unique in its shard)"


ReadFilter = Callable[[str, int], bool]  # (extension, size) -> whether to read the member's bytes


def _read_all(ext: str, size: int) -> bool:
    return True


def iter_tar_samples(
    path: str | os.PathLike, *, read: ReadFilter = _read_all, stream: bool = False, compressed: bool = True
) -> Iterator[TarSample]:
    """The samples of one shard, in order (see the module docstring for grouping and duplicates).

    `read(extension, size)` says which members' bytes to load into `TarSample.data`. `stream=True` reads the file
    once front to back (for data that is read whole anyway); otherwise members are found by seeking, without reading
    what is not asked for. `compressed=False` refuses compressed tars (member offsets must be file offsets).
    A broken shard raises ShardError after yielding the samples (and the partial sample) read before the damage."""
    mode = ("r|" if stream else "r:") + ("*" if compressed else "")
    seen: set[str] = set()
    current: TarSample | None = None
    count = 0
    try:
        with tarfile.open(path, mode=mode) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = sample_key(member.name)
                if current is not None and current.key != key:
                    yield current
                    count += 1
                    current = None
                if current is None:
                    current = TarSample(key)
                if member.name in seen:
                    current.duplicates.append(member.name)
                    continue
                seen.add(member.name)
                if read(ext, member.size):  # before the member is listed: a sample never lists bytes it lacks
                    data = tar.extractfile(member)
                    current.data[ext] = data.read() if data is not None else b""
                current.members[ext] = TarMember(member.name, member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        if current is not None:
            yield current
            count += 1
        raise ShardError(
            f"{os.path.basename(path)}: unreadable tar data after {count} samples ({type(e).__name__}: {e})"
        ) from e
    if current is not None:
        yield current


# --- members by offset -------------------------------------------------------------------------------------------


def member_source(path: str | os.PathLike, member: TarMember) -> str:
    """A string naming one member's bytes: ``tar://<path>#<offset>:<size>``."""
    return f"{TAR_PREFIX}{path}#{member.offset}:{member.size}"


def read_member(source: str) -> bytes:
    """The bytes a `member_source` string names, read at its offset. Raises ShardError."""
    path, _, span = source[len(TAR_PREFIX) :].rpartition("#")
    try:
        offset, size = (int(x) for x in span.split(":"))
    except ValueError:
        raise ShardError(f"not a tar member reference: {source!r}") from None
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise ShardError(f"cannot read tar shard {path}: {e.strerror or e}") from e
    if len(data) != size:
        raise ShardError(f"truncated tar member: {len(data)} of {size} bytes present")
    return data
