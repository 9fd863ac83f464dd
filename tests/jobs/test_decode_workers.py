"""Batch jobs decoding in worker processes (`--workers N`): the same rows, errors and resumability as decoding in
threads of the job's own process (`--workers 0`); the prefetcher's order, reuse and GPU hand-over logic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from jobs_helpers import (
    assert_same_output,
    batch_main_one_thread,
    kill_until_done,
    numbered_folder,
    read_errors,
    read_rows,
)

from blip.jobs import BatchConfig, run_batch
from blip.jobs import prefetch as prefetch_module
from blip.jobs.prefetch import BatchDecoder, DecodeWorkerError, Prefetcher, decode_key, default_workers
from blip.jobs.runner import TaskOptions
from blip.jobs.sources import Row
from blip.transforms import PreparedImage
from oracle import make_images


def _job(model, folder, out, workers: int, task: str = "caption", **extra):
    cfg = BatchConfig(
        task=task,
        model=str(model),
        input=str(folder),
        out=str(out),
        batch_size=3,
        shard_size=5,
        workers=workers,
        prefetch=2,
        progress=False,
        options=TaskOptions(max_new_tokens=6) if task == "caption" else TaskOptions(),
        **extra,
    )
    return run_batch(cfg)


def test_rows_and_errors_identical_with_workers_0_and_2(caption_model, image_folder, tmp_path):
    folder, good, bad = image_folder
    threads = _job(caption_model, folder, tmp_path / "threads", workers=0)
    started = time.perf_counter()
    processes = _job(caption_model, folder, tmp_path / "processes", workers=2)
    print(f"workers=2 job: {time.perf_counter() - started:.1f} s")
    rows = read_rows(tmp_path / "processes")
    assert rows == read_rows(tmp_path / "threads")  # same rows, same order, bit-equal scores
    assert [r["image"] for r in rows] == good
    errors = read_errors(tmp_path / "processes")
    assert errors == read_errors(tmp_path / "threads")
    reasons = {e["image"]: e["error"] for e in errors}
    assert reasons.keys() == bad.keys()  # each bad image failed its own row only
    for name, fragment in bad.items():
        assert fragment in reasons[name].lower(), (name, reasons[name])
    assert processes.summary.rows_ok == threads.summary.rows_ok == len(good)


def test_embeddings_identical_with_workers(retrieval_model, image_folder, tmp_path):
    import numpy as np

    folder, good, _ = image_folder
    _job(retrieval_model, folder, tmp_path / "threads", workers=0, task="embed", index_type="none")
    _job(retrieval_model, folder, tmp_path / "processes", workers=1, task="embed", index_type="none")
    for a, b in zip(sorted((tmp_path / "threads").glob("part-*.npy")), sorted((tmp_path / "processes").glob("*.npy"))):
        np.testing.assert_array_equal(np.load(a), np.load(b))
    assert read_rows(tmp_path / "threads") == read_rows(tmp_path / "processes")


def test_kill_9_and_resume_with_decode_workers(caption_model, tmp_path):
    folder = numbered_folder(tmp_path / "images", 40, seed=12)
    (folder / "0017.jpg").write_bytes(b"")  # a bad row
    args = ["caption", "--model", str(caption_model), "--input", str(folder), "--batch-size", "2", "--shard-size", "8"]
    args += ["--num-beams", "3", "--min-new-tokens", "12", "--max-new-tokens", "12", "--no-progress"]
    reference = tmp_path / "reference"
    assert batch_main_one_thread([*args, "--workers", "0", "--out", str(reference)]) == 1

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blip.jobs", "batch", *args, "--workers", "2", "--out", str(out)]
    kills = kill_until_done(command, out, seed=99, tries=2)
    assert kills >= 1, "the job finished too quickly to be killed mid-way"
    assert_same_output(out, reference)


# --- the prefetcher on its own ---------------------------------------------------------------------------------------


def _rows(folder, names):
    return [Row(name, str(folder / name)) for name in names]


@pytest.fixture
def small_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(make_images(7, seed=5)):
        image.save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    return folder


def _batches(folder):
    names = ["0.png", "1.png", "bad.png", "0.png", "2.png", "3.png", "4.png", "5.png", "6.png", "1.png"]
    rows = _rows(folder, names)
    return [rows[i : i + 3] for i in range(0, len(rows), 3)]


def _summary(prefetcher, batches):
    out = []
    for batch, decoded in prefetcher(batches):
        images = {key: image.tobytes() for key, image in decoded.images.items()}
        out.append(([r.id for r in batch], images, decoded.errors))
    return out


def test_processes_give_threads_results_in_order_and_are_reused(small_folder):
    batches = _batches(small_folder)
    expected = _summary(Prefetcher(16, list, workers=0, depth=2), batches)
    assert [ids for ids, _, _ in expected] == [[r.id for r in b] for b in batches]
    bad_key = decode_key(batches[0][2])
    assert list(expected[0][2]) == [bad_key] and "not an image" in expected[0][2][bad_key]  # only bad.png failed
    assert len(expected[0][1]) == 2 and len(expected[1][1]) == 3  # 0.png twice in batch 2: decoded once
    prefetcher = Prefetcher(16, list, workers=2, depth=3)
    try:
        assert _summary(prefetcher, batches) == expected
        first = prefetcher._loader
        assert _summary(prefetcher, batches[1:]) == expected[1:]  # a second call: the same worker processes
        assert prefetcher._loader is first
        stream = prefetcher(batches)
        next(stream)
        stream.close()  # stopped mid-way: the workers are stopped, the next call starts afresh
        assert prefetcher._loader is None
        assert _summary(prefetcher, batches) == expected
    finally:
        prefetcher.close()


def test_decoded_images_are_prepared_pixels_of_the_pil_images(small_folder):
    from blip.jobs.sources import read_image

    rows = _rows(small_folder, ["3.png", "4.png", "3.png"])
    decoded = BatchDecoder(24)[rows]
    assert decoded.keys == [rows[0].source, rows[1].source] and decoded.pixels.shape == (2, 24, 24, 3)
    for key, prepared in decoded.decoded().images.items():
        assert isinstance(prepared, PreparedImage)
        assert prepared.tobytes() == read_image(Row("x", key), 24).tobytes()
    own_size = BatchDecoder(None)[rows]  # no common size (CapFilt with two models of different sizes)
    assert own_size.pixels is None and [im.size for im in own_size.images] == [read_image(rows[0]).size] * 1 + [
        read_image(rows[1]).size
    ]


def test_a_dead_worker_is_one_clear_error(small_folder, monkeypatch):
    prefetcher = Prefetcher(16, list, workers=1, depth=1)

    def died():
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly\nmore")

    monkeypatch.setattr(prefetcher, "_data_loader", lambda: iter([]) if False else (died() for _ in [0]))
    with pytest.raises(DecodeWorkerError, match=r"pid\(s\) 4242\) exited unexpectedly\); rerun to resume"):
        list(prefetcher(_batches(small_folder)))


def test_default_workers(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, gpu, cpu in [(2, 1, 0), (4, 2, 0), (16, 14, 2), (64, 16, 4), (1, 1, 0)]:
        monkeypatch.setattr(prefetch_module, "available_cpus", lambda cpus=cpus: cpus)
        assert (default_workers("cuda:0"), default_workers("cpu")) == (gpu, cpu), cpus
    monkeypatch.setattr(prefetch_module, "available_cpus", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 torchrun ranks share the machine: 8 CPUs each
    assert default_workers("cuda:3") == 6


class _FakeCuda:
    """Records the stream calls of the GPU hand-over (the logic, on a machine without a GPU)."""

    def __init__(self):
        self.log: list[str] = []
        self.copies = 0

    def Stream(self, device):  # noqa: N802 - torch.cuda's name
        return "side"

    def stream(self, stream):
        log = self.log

        class Context:
            def __enter__(self):
                log.append(f"on {stream}")

            def __exit__(self, *exc):
                log.append("off")

        return Context()

    def Event(self):  # noqa: N802
        log = self.log

        class Event:
            def record(self, stream):
                log.append(f"record on {stream}")
                self.name = f"event{sum(e.startswith('record') for e in log)}"

        return Event()

    def current_stream(self, device):
        log = self.log
        return SimpleNamespace(wait_event=lambda event: log.append(f"main waits {event.name}"))


def test_gpu_hand_over_copies_one_batch_ahead_on_a_side_stream(small_folder, monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch, "cuda", fake)
    moved = []
    real_to = prefetch_module.DecodedBatch.to

    def to(self, device, non_blocking=False):
        fake.log.append(f"copy {len(moved)} non_blocking={non_blocking}")
        moved.append(device)
        return real_to(self, "cpu")

    monkeypatch.setattr(prefetch_module.DecodedBatch, "to", to)
    prefetcher = Prefetcher(16, list, workers=0, depth=2)
    prefetcher.cuda = True  # a CUDA device, as far as the hand-over knows
    seen = []
    for batch, _ in prefetcher(_batches(small_folder)):
        seen.append(batch[0].id)
        fake.log.append(f"model runs {batch[0].id}")
    assert seen == [b[0].id for b in _batches(small_folder)]
    log = [e for e in fake.log if e not in ("off",)]
    # batch k+1's copy is issued (on the side stream) before batch k is handed to the model, which waits only for
    # its own copy's event
    assert log[:9] == [
        "on side",
        "copy 0 non_blocking=True",
        "record on side",
        "on side",
        "copy 1 non_blocking=True",
        "record on side",
        "main waits event1",
        "model runs 0.png",
        "on side",
    ]
    assert log[-2:] == ["main waits event4", "model runs 1.png"] and len(moved) == 4


_HOLD_WORKERS = """
import sys, time
from blip.jobs.prefetch import Prefetcher
from blip.jobs.sources import Row
if __name__ == "__main__":
    rows = [Row(str(i), sys.argv[1]) for i in range(64)]
    prefetcher = Prefetcher(16, list, workers=2, depth=2)
    batches = iter(prefetcher([rows[i : i + 2] for i in range(0, 64, 2)]))
    next(batches)  # the workers are up and have more batches decoded than taken
    print("ready", flush=True)
    time.sleep(120)
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # an exited process nobody reaped yet is gone
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process parents from /proc (Linux)")
def test_decode_workers_exit_when_the_job_is_killed(small_folder):
    script = small_folder.parent / "hold.py"
    script.write_text(_HOLD_WORKERS)
    command = [sys.executable, str(script), str(small_folder / "0.png")]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "ready"
        workers = [pid for pid in _children(job.pid) if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
        assert len(workers) == 2
    finally:
        job.kill()
        job.wait()
    deadline = time.monotonic() + 3  # sooner than DataLoader's own 5 s check, which a blocked worker never reaches
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"decode workers {left} outlived the killed job"


_ORPHANED_AT_START = """
import multiprocessing, os, sys, time


def worker(pid_file):
    from blip.jobs.prefetch import _exit_with_parent

    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    while os.getppid() == multiprocessing.parent_process().pid:  # the job is killed while its workers start
        time.sleep(0.05)
    _exit_with_parent(0)
    time.sleep(30)


if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=worker, args=(sys.argv[1],)).start()
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    time.sleep(0.2)
    os._exit(0)  # kill -9 as far as the worker can tell: no clean-up, no join
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc (Linux)")
def test_a_decode_worker_exits_when_the_job_died_before_its_init(tmp_path):
    # a worker's parent-watch must compare with the job's pid, not with whatever os.getppid() says at init: once
    # the job is gone that is init's (or a subreaper's) pid, which never changes again
    script, pid_file = tmp_path / "orphan.py", tmp_path / "worker.pid"
    script.write_text(_ORPHANED_AT_START)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script), str(pid_file)], env=env, check=True, timeout=60)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    left = _alive(pid)
    if left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a decode worker orphaned before its init outlived the job"
