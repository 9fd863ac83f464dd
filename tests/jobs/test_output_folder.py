"""The output folder is the job's only where a manifest of ours says so (nothing else is ever deleted), one job at a
time holds it, and a full disk or an --out that is a file is one line and exit 2 (a rerun resumes)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from jobs_helpers import one_line, read_errors, read_rows, snapshot

import blip.jobs.writer as writer
from blip.jobs.cli import batch_main
from blip.jobs.lock import LOCK, OutputLock


def _args(model, folder, out, *extra):
    return ["caption", "-m", str(model), "-i", str(folder), "-o", str(out), "--no-progress", *extra]


def test_a_users_folder_survives_with_and_without_overwrite(caption_model, retrieval_model, image_folder, tmp_path):
    """The folder of issue 14.6: an index/ and an errors.jsonl of the user's own, no manifest."""
    folder, _, _ = image_folder
    out = tmp_path / "mine"
    (out / "index" / "embeddings_v1").mkdir(parents=True)
    (out / "index" / "embeddings_v1" / "vectors.txt").write_text("0.1 0.2 0.3\n")
    (out / "errors.jsonl").write_text('{"my": "own errors"}\n')
    before = snapshot(out)
    for argv in (
        _args(caption_model, folder, out),
        _args(caption_model, folder, out, "--overwrite"),
        ["embed", *_args(retrieval_model, folder, out)[1:]],
        ["embed", *_args(retrieval_model, folder, out, "--overwrite")[1:]],
    ):
        assert batch_main(argv) == 2, argv
        assert snapshot(out) == before, argv  # byte for byte, and no lock file left behind


def test_overwrite_deletes_exactly_what_the_manifest_names(caption_model, image_folder, tmp_path, capsys):
    folder, good, _ = image_folder
    out = tmp_path / "out"
    assert batch_main(_args(caption_model, folder, out, "--shard-size", "4", "--max-new-tokens", "4")) == 1
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["owns"]["shard_files"] == {"prefix": "part", "extensions": ["jsonl"], "count": 5}
    (out / "notes.md").write_text("mine")  # a user's files beside the results
    (out / "part-000007.jsonl").write_text("mine too: the job has 5 shards")
    (out / "sub").mkdir()
    (out / "sub" / "errors.jsonl").write_text("mine")
    mine = {k: v for k, v in snapshot(out).items() if k in ("notes.md", "part-000007.jsonl", "sub", "sub/errors.jsonl")}

    assert (
        batch_main(_args(caption_model, folder, out, "--shard-size", "9", "--max-new-tokens", "5", "--overwrite")) == 1
    )
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    ours = ["part-000000.jsonl", "part-000001.jsonl"]
    assert sorted(p.name for p in out.glob("part-*.jsonl")) == [*ours, "part-000007.jsonl"]
    assert sum(len((out / name).read_text().splitlines()) for name in ours) == len(good)
    assert json.loads((out / "_manifest.json").read_text())["job"]["options"]["max_new_tokens"] == 5

    # a job that would write a file no manifest names (its 8th shard) is refused, and nothing is deleted
    before = snapshot(out)
    capsys.readouterr()
    assert batch_main(_args(caption_model, folder, out, "--shard-size", "2", "--overwrite")) == 2
    line = one_line(capsys.readouterr().err)
    assert "part-000007.jsonl" in line and "no _manifest.json" in line
    assert snapshot(out) == before


def test_out_is_a_file(caption_model, image_folder, tmp_path, capsys):
    folder, _, _ = image_folder
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    for extra in ((), ("--overwrite",)):
        assert batch_main(_args(caption_model, folder, out, *extra)) == 2
        line = one_line(capsys.readouterr().err)
        assert "is a file, not a folder" in line and "choose a folder" in line
    assert out.read_text() == "not a folder"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from blip.jobs import runner
    from blip.jobs.cli import batch_main

    real = runner.RowRunner._infer

    def slow(self, rows, decoded):  # the same results, slowly: the job is still running when the test looks
        time.sleep(0.4)
        return real(self, rows, decoded)

    runner.RowRunner._infer = slow
    sys.exit(batch_main(sys.argv[1:]))
    """
)


def test_one_job_at_a_time_and_a_killed_holder_blocks_nothing(caption_model, image_folder, tmp_path, capsys):
    folder, good, bad = image_folder
    out = tmp_path / "out"
    job = _args(caption_model, folder, out, "--batch-size", "2", "--shard-size", "4", "--max-new-tokens", "4")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *job], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("_receipts/*.json")) and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
        # a second job, with other options, on the same folder: refused, naming the holder
        assert batch_main(_args(caption_model, folder, out, "--max-new-tokens", "20")) == 2
        line = one_line(capsys.readouterr().err)
        assert "in use by another job" in line and f"pid {holder.pid} " in line
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["job"]["options"]["max_new_tokens"] == 4
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).exists()  # a stale lock file: information only, the kernel dropped the lock
    assert batch_main(job) == 1  # 1: the bad files' rows failed
    assert "resumed" in capsys.readouterr().err
    assert sorted(r["image"] for r in read_rows(out)) == good and len(read_errors(out)) == len(bad)
    assert not (out / LOCK).exists()


def test_the_lock_says_who_holds_it(tmp_path):
    with OutputLock(tmp_path / "o"):
        with pytest.raises(RuntimeError, match=rf"in use by another job \(pid {os.getpid()} on .* since "):
            OutputLock(tmp_path / "o").acquire()
    with OutputLock(tmp_path / "o"):  # released: free again
        pass
    assert not (tmp_path / "o" / LOCK).exists()


@pytest.mark.parametrize("where", ["journal", "shard file"])
def test_a_full_disk_is_one_line_and_a_rerun_resumes(caption_model, image_folder, tmp_path, monkeypatch, capsys, where):
    folder, _, _ = image_folder
    job = ("--batch-size", "3", "--shard-size", "5", "--max-new-tokens", "4")
    reference = tmp_path / "reference"
    assert batch_main(_args(caption_model, folder, reference, *job)) == 1
    capsys.readouterr()

    calls = {"n": 0}
    real_append, real_write = writer.Journal.append, writer.atomic_write_bytes

    def full_journal(self, record):
        calls["n"] += 1
        if calls["n"] == 4:  # half a line reaches the disk, then it is full
            with open(self.path, "ab") as f:
                f.write(record.to_line()[:40])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, record)

    def full_disk(path, data, **kw):
        if Path(path).name.startswith("part-"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, **kw)

    if where == "journal":
        monkeypatch.setattr(writer.Journal, "append", full_journal)
    else:
        monkeypatch.setattr(writer, "atomic_write_bytes", full_disk)
    out = tmp_path / "out"
    assert batch_main(_args(caption_model, folder, out, *job)) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("blip batch caption: error: no space left on the device of") and str(out) in line
    assert "rerun the same command" in line
    monkeypatch.undo()

    assert batch_main(_args(caption_model, folder, out, *job)) == 1
    assert "resumed" in capsys.readouterr().err
    for name in sorted(p.name for p in reference.glob("part-*")):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert read_errors(out) == read_errors(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
