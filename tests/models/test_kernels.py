"""`blip.models.kernels`: the oneDNN linear path equals `F.linear` (+ GELU), in inference and in training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blip.models import kernels
from blip.models.kernels import Linear, linear, onednn_linear_available

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="oneDNN linears are off on this machine")


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(1, 768), (3, 7, 768), (0, 768)])
def test_linear_matches_f_linear(shape: tuple[int, ...], gelu: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    weight, bias = torch.randn(96, 768, generator=generator), torch.randn(96, generator=generator)
    reference = F.linear(x, weight, bias)
    reference = F.gelu(reference) if gelu else reference
    with torch.inference_mode():
        out = linear(x, weight, bias, gelu)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4)


def test_linear_non_contiguous_input_and_no_bias() -> None:
    x = torch.randn(4, 9, 64)[:, -1]  # a strided slice, as the decoder's last position is
    weight = torch.randn(32, 64)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_linear_bfloat16() -> None:
    x, weight, bias = torch.randn(5, 64).bfloat16(), torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    with torch.inference_mode():
        out = linear(x, weight, bias, gelu=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.gelu(F.linear(x, weight, bias)).float(), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_inference_and_training_go_to_onednn_autocast_to_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(kernels, "_onednn_linear", spy)
    layer = Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.inference_mode():
        layer(x, gelu=True)
    assert calls == ["gelu"]  # inference: one fused call
    # With autograd on, the layer trains through oneDNN (forward and input gradient; the GELU stays separate) and
    # its gradients are F.linear's.
    out = layer(x)
    out.sum().backward()
    assert calls == ["gelu", "none"]
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(8, -1))
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert calls == ["gelu", "none", "none", "none"]
    # Under autocast PyTorch picks the product dtypes: F.linear, no oneDNN call.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert len(calls) == 4


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (4, 9, 16)])
def test_training_gradients_match_f_linear(shape: tuple[int, ...], gelu: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=generator, requires_grad=True)
    weight = torch.randn(24, 16, generator=generator, requires_grad=True)
    bias = torch.randn(24, generator=generator, requires_grad=True)
    x = base[:, -1] if shape[-2:] == (9, 16) else base  # a strided slice, as the decoder's last position is
    out = linear(x, weight, bias, gelu)
    reference = F.gelu(F.linear(x, weight, bias)) if gelu else F.linear(x, weight, bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out.shape, generator=generator)
    ours = torch.autograd.grad(out, (base, weight, bias), upstream)
    expected = torch.autograd.grad(reference, (base, weight, bias), upstream)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_setting_off_and_bad_setting() -> None:
    _path = {"PATH": "", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}  # the sources under test (a worktree's)
    code = "from blip.models.kernels import onednn_linear_available as a; print(a())"
    off = subprocess.run(
        [sys.executable, "-c", code], env={"BLIP_CPU_MATMUL": "aten", **_path}, capture_output=True, text=True
    )
    assert off.stdout.strip() == "False", off.stderr
    bad = subprocess.run(
        [sys.executable, "-c", code], env={"BLIP_CPU_MATMUL": "blas", **_path}, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "BLIP_CPU_MATMUL must be auto, onednn or mkl" in bad.stderr
