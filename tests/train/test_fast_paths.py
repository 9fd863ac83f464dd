"""Training speed paths: which AdamW kernel runs where, and `compile=true` (torch.compile of the training forward)
giving the same steps as eager and checkpoints without the compiled wrapper's names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from blip.distributed import DistInfo
from blip.train.config import TrainConfig
from blip.train.loop import LoopSettings, Trainer
from blip.train.optim import LRSchedule, adamw_kernel, build_optimizer
from blip.weights.checkpoint import load_checkpoint


def _fake(device: str, floating: bool = True):
    """What `adamw_kernel` reads of a parameter (a CUDA one on a machine without a GPU)."""
    return SimpleNamespace(is_cuda=device == "cuda", device=torch.device(device), is_floating_point=lambda: floating)


def test_adamw_kernel_by_device():
    assert adamw_kernel([_fake("cuda"), _fake("cuda")]) == {"fused": True}
    assert adamw_kernel([_fake("cuda"), _fake("cuda", floating=False)]) == {}  # fused needs floating point
    assert adamw_kernel([torch.zeros(2), torch.zeros(3, 3)]) == {"foreach": True}
    assert adamw_kernel([torch.zeros(2), torch.zeros(2, device="meta")]) == {}  # mixed: PyTorch's own choice
    assert adamw_kernel([]) == {}


def test_cpu_optimizer_is_foreach_with_the_single_tensor_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    twin = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    fast = build_optimizer(model, lr=1e-2, decay_1d=False)
    assert fast.defaults["foreach"] is True and not fast.defaults.get("fused")
    plain = torch.optim.AdamW(
        [
            {"params": [p for p in twin.parameters() if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        foreach=False,
    )
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((model, fast), (twin, plain)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _Task(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))

    def before_step(self, step: int) -> None:
        pass

    def forward(self, batch: dict) -> dict:
        return {"loss": self.model(batch["x"]).pow(2).mean()}


class _Data:
    micro_batches_per_epoch = 100

    def batches(self, epoch: int, start: int):
        generator = torch.Generator().manual_seed(epoch * 1000 + start)
        while True:
            yield {"x": torch.randn(6, 4, generator=generator)}


def _fit(tmp_path, compile: bool):
    task = _Task()
    trainer = Trainer(
        task,
        build_optimizer(task, lr=1e-2),
        LRSchedule(1e-2, 6),
        _Data(),
        LoopSettings(total_steps=6, log_every=1, compile=compile, ckpt_every=6),
        out_dir=tmp_path,
        dist=DistInfo(),
    )
    return trainer, trainer.fit()


def test_compile_flag_trains_like_eager(tmp_path):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable on this platform")
    assert TrainConfig(compile=True).compile and not TrainConfig().compile
    eager, _ = _fit(tmp_path / "eager", compile=False)
    fast, result = _fit(tmp_path / "compiled", compile=True)
    assert result.finished
    assert fast.wrapped is not fast.task and type(fast.wrapped).__name__ == "OptimizedModule"
    for a, b in zip(eager.task.parameters(), fast.task.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    saved = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert saved.keys() == load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"].keys()
    assert not any("_orig_mod" in key for key in saved)
