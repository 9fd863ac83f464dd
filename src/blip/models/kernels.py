"""Linear layers whose CPU inference runs on oneDNN instead of MKL.

Every x86 PyTorch build carries two fp32 matrix-product libraries: MKL (what `F.linear` calls) and oneDNN. MKL picks
its code path by CPU vendor; on AMD it takes a generic one. On the 2-core AMD Zen 5 our benchmarks run on, MKL
reaches ~150 GFLOP/s on a 2048^3 product and on the ViT-B MLP product, and 11-15 GB/s of weight reads on a batch-1
decoding product, where oneDNN's `_linear_pointwise` reaches 367-388 GFLOP/s, 250-380 GFLOP/s and 24-32 GB/s, with
results equal to rounding (benchmarks/vs_transformers.py prints both libraries' rates).

So `Linear` and `linear` send CPU inference (no autograd) in float32/bfloat16 to oneDNN, optionally with the GELU
fused in. CPU training in float32/bfloat16 (outside autocast) goes there too, through `_OneDnnLinearFunction`: the
forward product and the input gradient on oneDNN, the weight gradient (a product over the batch, which oneDNN was
slower at in our measurements) on `torch.mm`. The demo model's training steps run 1.15-1.3x faster that way on the
2-core AMD EPYC (`benchmarks/bench_train.py --compare-matmul --patch-size 16`). GPUs, autocast and anything the
checks below reject use `F.linear`.
`BLIP_CPU_MATMUL=aten` turns the oneDNN path off, `BLIP_CPU_MATMUL=onednn` forces it on non-x86 CPUs too; inside
`aten_linears()` every product takes `F.linear` (tracing for ONNX export: the oneDNN op has no ONNX form).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)
_aten_only = False  # set by `aten_linears()`


@contextlib.contextmanager
def aten_linears() -> Iterator[None]:
    """Within the block, `linear` and `Linear` compute with `F.linear` only (e.g. while tracing for ONNX export)."""
    global _aten_only
    saved, _aten_only = _aten_only, True
    try:
        yield
    finally:
        _aten_only = saved


@functools.cache
def onednn_linear_available() -> bool:
    """Whether oneDNN linears are used: the setting allows it, the op exists, and it agrees with `F.linear`."""
    setting = os.environ.get("BLIP_CPU_MATMUL", "auto").strip().lower()
    if setting not in ("auto", "onednn", "aten"):
        raise ValueError(f"BLIP_CPU_MATMUL must be auto, onednn or aten, got {setting!r}")
    if setting == "aten":
        return False
    if setting == "auto" and platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:  # the op is internal to PyTorch (inductor uses it): check it on this build before trusting it
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(shape, generator=generator) for shape in ((3, 5, 16), (24, 16), (24,)))
            plain = _onednn_linear(x, w, b, "none", [], "")
            fused = _onednn_linear(x, w, b, "gelu", [], "none")
            reference = F.linear(x, w, b)
            return bool(
                torch.allclose(plain, reference, atol=1e-5) and torch.allclose(fused, F.gelu(reference), atol=1e-5)
            )
    except (RuntimeError, TypeError):
        return False


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str, scalars: list, algorithm: str
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars, algorithm)


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        not _aten_only
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and x.numel() > 0
        and onednn_linear_available()
    )


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


class _OneDnnLinearFunction(torch.autograd.Function):
    """`F.linear` with autograd: y = x W^T + b and dx = dy W on oneDNN, dW = dy^T x on `torch.mm`, db = sum(dy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None, "none", [], "")  # W^T as a strided view: no copy
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = flat.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """`F.linear`, then the exact (erf) GELU when `gelu`; on oneDNN on the CPU (fused GELU for inference)."""
    if _onednn_ok(x, weight, bias):
        if not _needs_grad(x, weight, bias):
            attr, algorithm = ("gelu", "none") if gelu else ("none", "")  # algorithm "none": the erf GELU, as F.gelu
            return _onednn_linear(x, weight, bias, attr, [], algorithm)
        if not torch.is_autocast_enabled("cpu"):
            y = _OneDnnLinearFunction.apply(x, weight, bias)
            return F.gelu(y) if gelu else y
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict names) computed by `linear`; its weight may be packed for
    oneDNN (`pack_linears`), which changes its memory layout but nothing else: the state dict still holds the plain
    matrix, and moving or casting the module unpacks it first."""

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.weight.is_mkldnn:
            return _packed_linear(x, self.weight, self.bias, gelu)
        return linear(x, self.weight, self.bias, gelu)

    def unpack(self) -> None:
        """Back to a plain weight matrix (a no-op when it is not packed)."""
        if self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=self._plain_requires_grad)

    def __getstate__(self) -> dict:  # pickle and deepcopy: a packed weight has no storage; copies get the plain one
        state = self.__dict__.copy()
        if self.weight.is_mkldnn:
            plain = nn.Parameter(self.weight.to_dense(), requires_grad=self._plain_requires_grad)
            state["_parameters"] = {**self._parameters, "weight": plain}
        return state

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(), ...: a packed weight has no such ops
        self.unpack()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --- packed weights --------------------------------------------------------------------------------------------
# oneDNN computes with its own blocked weight layout. Given a plain matrix it reorders the weight on every call: a
# batch-1 decoding product then reads and writes the matrix once more than it needs to. On the 2-core AMD Zen 5 a
# bfloat16 [1, 2560] x [2560, 10240] product streams 25-33 GB/s of weights from the plain matrix and 73-80 GB/s from
# a packed one; a ViT-g MLP product (257 rows) runs 830 -> 970 GFLOP/s in bfloat16 and 440 -> 500 in float32. The
# results are bit-identical (same kernel, same order of sums). So `blip.load` packs the weights of a CPU model's
# linears once, in place (no second copy), unless BLIP_CPU_MATMUL=aten.


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    if (
        _aten_only
        or x.device.type != "cpu"
        or x.dtype != packed.dtype
        or x.numel() == 0
        or torch.is_autocast_enabled("cpu")
    ):
        y = F.linear(x, packed.to_dense().to(x.dtype), None if bias is None else bias.to(x.dtype))
        return F.gelu(y) if gelu else y
    if torch.is_grad_enabled() and x.requires_grad:  # e.g. Grad-CAM: gradients for the input only
        y = _PackedLinearFunction.apply(x, packed, bias)
        return F.gelu(y) if gelu else y
    attr, algorithm = ("gelu", "none") if gelu else ("none", "")
    return _onednn_linear(x, packed, bias, attr, [], algorithm)


class _PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with a packed (frozen) W; dx = dy W from the plain matrix, made only when a gradient is asked."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.packed = packed
        return _onednn_linear(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad.matmul(ctx.packed.to_dense()), None, None


def pack_linears(model: nn.Module) -> int:
    """Pack, in place, the weight of every `Linear` of a CPU inference model whose weight is float32/bfloat16 and
    not shared with another module (a tied output head stays plain: its embedding needs the matrix). Returns how
    many were packed; none where oneDNN linears are off (BLIP_CPU_MATMUL=aten, or no usable oneDNN)."""
    if not onednn_linear_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return 0
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    packed = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        weight = module.weight
        if (
            weight.is_mkldnn
            or weight.device.type != "cpu"
            or weight.dtype not in _DTYPES
            or uses.get(id(weight), 0) != 1
            or (module.bias is not None and module.bias.dtype != weight.dtype)
        ):
            continue
        module._plain_requires_grad = weight.requires_grad
        with torch.no_grad():
            module.weight = nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), requires_grad=False
            )
        del weight  # the plain matrix is freed here (load builds each parameter once): no second copy of the model
        packed += 1
    return packed


def unpack_linears(model: nn.Module) -> None:
    """Undo `pack_linears` (plain weight matrices again)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.unpack()
