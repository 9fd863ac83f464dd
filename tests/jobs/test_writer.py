"""The output folder's crash safety, piece by piece: torn journals, crashes between the commit steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jobs_helpers import read_errors, read_rows

import blip.jobs.writer as writer
from blip.jobs import BatchConfig, run_batch
from blip.jobs.writer import BatchRecord, Journal, OutputDir

HEADER = {"journal": 1, "shard": 0, "rows": 10, "job": "abc"}


def _record(start, n, dim=None):
    items = [{"ok": {"image": f"r{start + i}"}} for i in range(n)]
    emb = np.arange(n * dim, dtype=np.float32).reshape(n, dim) + start if dim else None
    return BatchRecord(start, items, emb)


def test_journal_recovers_whole_batches_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "j"
    journal = Journal(path, HEADER)
    journal.append(_record(0, 4, dim=3))
    journal.append(_record(4, 4, dim=3))
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole + _record(8, 2, dim=3).to_line()[:-25])  # killed while writing the third batch
    again = Journal(path, HEADER)
    assert again.rows_done == 8 and len(again.records) == 2
    np.testing.assert_array_equal(again.records[1].embeddings, _record(4, 4, dim=3).embeddings)
    assert path.read_bytes() == whole  # the torn line is cut off
    again.append(_record(8, 2, dim=3))
    again.close()
    assert Journal(path, HEADER).rows_done == 10


def test_journal_of_another_job_is_discarded(tmp_path):
    path = tmp_path / "j"
    journal = Journal(path, HEADER)
    journal.append(_record(0, 4))
    journal.close()
    assert Journal(path, {**HEADER, "job": "other"}).rows_done == 0
    assert not path.exists()
    path.write_bytes(b'{"journal": 1')  # torn header
    assert Journal(path, HEADER).rows_done == 0


def test_journal_refuses_a_gap(tmp_path):
    journal = Journal(tmp_path / "j", HEADER)
    with pytest.raises(RuntimeError, match="expected 0"):
        journal.append(_record(4, 4))


@pytest.mark.parametrize("crash_at", ["rows", "receipt"])
def test_crash_inside_commit_then_resume(caption_model, image_folder, tmp_path, monkeypatch, crash_at):
    """Die after a shard's files are in place but before its receipt (or while writing the files): the rerun
    rebuilds that shard from its journal and the output equals an uninterrupted run."""
    folder, _, _ = image_folder

    def config(out):
        return BatchConfig(
            task="caption", model=str(caption_model), input=str(folder), out=str(out), batch_size=3, shard_size=7
        )

    run_batch(config(tmp_path / "ref"))
    real_write_json, real_write_bytes = writer.atomic_write_json, writer.atomic_write_bytes
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def crash_json(path, obj, **kw):
        if crash_at == "receipt" and path.parent.name == "_receipts":
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed
        return real_write_json(path, obj, **kw)

    def crash_bytes(path, data, **kw):
        if crash_at == "rows" and path.name.startswith("part-") and path.suffix == ".jsonl":
            calls["n"] += 1
            if calls["n"] == 2:
                path.write_bytes(data[: len(data) // 2])  # a half-written file under the final name
                raise Killed
        return real_write_bytes(path, data, **kw)

    monkeypatch.setattr(writer, "atomic_write_json", crash_json)
    monkeypatch.setattr(writer, "atomic_write_bytes", crash_bytes)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run_batch(config(out))
    monkeypatch.undo()
    assert len(list((out / "_receipts").glob("*.json"))) == 1
    assert list((out / "_work").glob("*.journal"))
    run_batch(config(out))
    assert read_rows(out) == read_rows(tmp_path / "ref")
    assert read_errors(out) == read_errors(tmp_path / "ref")
    manifest = json.loads((out / "_manifest.json").read_text())
    reference = json.loads((tmp_path / "ref" / "_manifest.json").read_text())
    assert manifest["shards"] == reference["shards"] and manifest["fingerprint"] == reference["fingerprint"]


def test_clear_removes_only_what_the_manifest_names(tmp_path):
    out = OutputDir(tmp_path, embed_format="npy")
    out.prepare({"input": {"rows": 3}}, "f", overwrite=False, num_shards=2)
    for name in ("part-000000.jsonl", "part-000001.npy", "errors.jsonl", "part-x.txt", "keep.md", "part-000002.jsonl"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".part-000001.jsonl.123.abcd1234.tmp").write_text("a killed write")
    OutputDir(tmp_path).clear()
    # part-000002.jsonl: the job has two shards, so no manifest of ours names a third; nor part-x.txt or keep.md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.md", "part-000002.jsonl", "part-x.txt"]
    OutputDir(tmp_path).clear()  # without a manifest nothing is ours: nothing goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.md", "part-000002.jsonl", "part-x.txt"]
