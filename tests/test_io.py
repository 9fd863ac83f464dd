"""`blip.io`: atomic writes leave the old file or the new one (never a part, never a stray temporary), JSONL."""

from __future__ import annotations

import pytest

from blip.io import atomic_path, atomic_write_bytes, atomic_write_json, json_bytes, jsonl_bytes, read_jsonl


def test_atomic_writes_replace_and_clean_up(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": "é"})
    assert target.read_bytes() == json_bytes({"a": "é"}) == '{\n "a": "é"\n}\n'.encode()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed while writing")
    assert target.read_bytes() == json_bytes({"a": "é"})  # the old content, untouched
    atomic_write_bytes(target, b"new", fsync=False)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary left behind


def test_jsonl_round_trip(tmp_path):
    rows = [{"image": "a.png", "caption": "ünïcode"}, {"n": 1}]
    (tmp_path / "r.jsonl").write_bytes(jsonl_bytes(rows) + b"\n")
    assert read_jsonl(tmp_path / "r.jsonl") == rows
    assert jsonl_bytes(rows).count(b"\n") == 2 and "ünïcode".encode() in jsonl_bytes(rows)
