"""torchrun with 2 processes (gloo, CPU) at batch B gives the loss curve of 1 process at batch 2B.

The global batch is the same in both runs (the sampler hands each rank a contiguous slice of it); ITC compares with
the momentum features of all ranks (`concat_all_gather`), ITM draws its hard negatives from the whole global batch
(image tokens gathered with gradient), LM averages over the global token count, DDP averages the gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import as_overrides, tiny_config

from blip.weights.checkpoint import load_checkpoint


def _curve(folder) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.endswith("loss")} for row in rows]


def _launch(cfg, nproc: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    command = [*launcher, "--nproc_per_node", str(nproc), "-m", "blip.train.cli", *as_overrides(cfg)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, shapes_dir, task):
    two = tiny_config(task, shapes_dir, tmp_path / "two", batch_size=4, max_steps=5)
    one = two.replace(out_dir=str(tmp_path / "one"), batch_size=8)
    _launch(two, nproc=2)
    _launch(one, nproc=1)
    curve_two, curve_one = _curve(tmp_path / "two"), _curve(tmp_path / "one")
    assert len(curve_two) == len(curve_one) == 5
    names = {"pretrain": {"itc_loss", "itm_loss", "lm_loss", "loss"}, "retrieval": {"itc_loss", "itm_loss", "loss"}}
    assert set(curve_one[0]) == names[task]
    for step, (a, b) in enumerate(zip(curve_two, curve_one), 1):
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), f"step {step} {name}: {a[name]} vs {b[name]}"
    ckpt_two, ckpt_one = (
        load_checkpoint(tmp_path / "two" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
    )
    assert ckpt_two["world_size"] == 2 and ckpt_one["world_size"] == 1 and len(ckpt_two["rng"]) == 2
    for key, value in ckpt_one["model"].items():
        assert torch.allclose(ckpt_two["model"][key], value, atol=1e-3), key
    # the queues were filled with the gathered momentum features of both ranks, in rank order
    queue_two, queue_one = ckpt_two["task_state"]["itc.image_queue"], ckpt_one["task_state"]["itc.image_queue"]
    assert torch.allclose(queue_two, queue_one, atol=1e-3)
    assert int(ckpt_two["task_state"]["itc.queue_ptr"]) == int(ckpt_one["task_state"]["itc.queue_ptr"]) == (5 * 8) % 32
