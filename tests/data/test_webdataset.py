"""The one reader of manifests and WebDataset shards (`blip.data.manifests`, `blip.data.webdataset`), on its own."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from blip.data.manifests import DataError, read_records
from blip.data.webdataset import (
    ShardError,
    expand_shards,
    is_shard_pattern,
    iter_tar_samples,
    member_source,
    read_member,
    sample_key,
)


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if len(name) > 100:
                info.pax_headers = {"comment": "x" * 600}  # a PAX extended header before the member
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("x/0001.png", b"\x89PNG first"),
    ("x/0001.seg.png", b"segmentation"),
    ("x/0001.TXT", b"a caption"),
    ("x/0002.jpg", b"\xff\xd8\xff second"),
    ("x/" + "long" * 30 + ".png", b"a long name"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_samples_keys_and_offsets(tmp_path, stream):
    path = tmp_path / "s.tar"
    path.write_bytes(_tar_bytes(MEMBERS))
    samples = list(iter_tar_samples(path, stream=stream))
    assert [s.key for s in samples] == ["x/0001", "x/0002", "x/" + "long" * 30]
    assert list(samples[0].members) == ["png", "seg.png", "txt"]
    assert samples[0].image_extension() == "png" and samples[0].text_extension() == "txt"
    assert samples[1].image_extension() == "jpg" and samples[1].text_extension() is None
    for sample in samples:
        for ext, member in sample.members.items():
            assert read_member(member_source(path, member)) == sample.data[ext] == dict(MEMBERS)[member.name]
    assert not any(s.duplicates for s in samples)


def test_read_filter_and_compressed_shards(tmp_path):
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes(MEMBERS)))
    names = [s.key for s in iter_tar_samples(path, read=lambda ext, size: ext == "txt")]
    assert names == ["x/0001", "x/0002", "x/" + "long" * 30]
    first = next(iter_tar_samples(path, read=lambda ext, size: ext == "txt"))
    assert first.data == {"txt": b"a caption"}
    with pytest.raises(ShardError, match="unreadable tar data after 0 samples"):
        list(iter_tar_samples(path, compressed=False))  # offsets must be file offsets: refused


def test_a_broken_shard_yields_what_came_before_then_raises(tmp_path):
    data = _tar_bytes(MEMBERS[:4], fmt=tarfile.USTAR_FORMAT)
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: 512 * 7 + 5])  # inside the fourth member's data
    seen = []
    with pytest.raises(ShardError, match="cut.tar: unreadable tar data after 2 samples"):
        for sample in iter_tar_samples(path, stream=True):
            seen.append(sample.key)
    assert seen == ["x/0001", "x/0002"]  # the sample being read when the damage came is yielded too...
    partial = list(_samples_until_error(path))[-1]
    assert partial.key == "x/0002" and partial.members == {} and partial.data == {}  # ...without the cut member


def _samples_until_error(path):
    try:
        yield from iter_tar_samples(path, stream=True)
    except ShardError:
        pass


def test_duplicate_member_names(tmp_path):
    members = [("a.png", b"1"), ("a.txt", b"t"), ("a.png", b"2"), ("b.png", b"3"), ("a.txt", b"u"), ("c.png", b"4")]
    path = tmp_path / "dup.tar"
    path.write_bytes(_tar_bytes(members))
    samples = list(iter_tar_samples(path))
    assert [(s.key, s.duplicates) for s in samples] == [("a", ["a.png"]), ("b", []), ("a", ["a.txt"]), ("c", [])]
    assert samples[0].data["png"] == b"1"  # the first copy is what a sample holds; it is reported, not used
    assert "duplicate member name in dup.tar: a.png" in samples[0].duplicate_problem("dup.tar")
    assert samples[1].duplicate_problem("dup.tar") is None


def test_sample_key_and_patterns(tmp_path):
    assert sample_key("dir/sub/0001.seg.PNG") == ("dir/sub/0001", "seg.png")
    assert sample_key("noext") == ("noext", "")
    for name in ("a-000.tar", "b-001.tar", "b-002.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in expand_shards(str(tmp_path / "b-{000..002}.tar"))] == [
        "b-000.tar",
        "b-001.tar",
        "b-002.tar",
    ]  # a brace pattern names shards whether they exist or not
    assert len(expand_shards(f"{tmp_path}/*.tar {tmp_path}/a-000.tar")) == 4
    assert expand_shards(str(tmp_path / "none-*.tar")) == []
    assert is_shard_pattern("x.tar") and is_shard_pattern("w-{0..9}.jsonl") and not is_shard_pattern("m.jsonl")


def test_records_of_jsonl_csv_and_tsv(tmp_path):
    (tmp_path / "m.jsonl").write_text('\ufeff{"image": "a.png"}\n\n[1]\n{broken\n{"image": "b.png", "text": "t"}\n')
    manifest = read_records(tmp_path / "m.jsonl")
    assert [(r.line, r.data) for r in manifest.records] == [
        (1, {"image": "a.png"}),
        (3, None),
        (4, None),
        (5, {"image": "b.png", "text": "t"}),
    ]
    assert "expected a JSON object, got list" in manifest.records[1].problem
    assert "not valid JSON" in manifest.records[2].problem
    assert manifest.columns == ["image", "text"]
    (tmp_path / "m.csv").write_text('\ufeffimage,text\na.png,"two\nlines"\nb.png,,extra\nc.png,\n')
    manifest = read_records(tmp_path / "m.csv")
    assert manifest.columns == ["image", "text"]  # the byte-order mark is not part of the first name
    assert [(r.line, r.data) for r in manifest.records] == [
        (3, {"image": "a.png", "text": "two\nlines"}),
        (4, None),
        (5, {"image": "c.png"}),
    ]
    assert manifest.records[1].problem == "line 4: 1 more fields than the header has"
    (tmp_path / "m.tsv").write_text("image\ttext\na.png\tx y\n")
    assert read_records(tmp_path / "m.tsv").records[0].data == {"image": "a.png", "text": "x y"}
    (tmp_path / "bad.jsonl").write_bytes(b'{"image": "\xff"}\n')
    with pytest.raises(DataError, match="cannot read the manifest"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="not a JSONL, CSV or TSV"):
        read_records(tmp_path / "m.txt")
