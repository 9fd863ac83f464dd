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
2-core AMD EPYC (`benchmarks/bench_train.py --compare-matmul --patch-size 16`). GPUs, autocast, code traced by
`torch.compile` and anything the checks below reject use `F.linear`.
The same build on an Intel Xeon ran MKL faster (779 against 658 GFLOP/s), so on x86 the library is chosen by
measurement: at the first CPU linear a short probe (`probe_matmul`: a [64x768]x[768x3072] product and batch-1 GEMVs
over 38 MB of weights, best of 5 each, interleaved, on one thread in CPU time; 30-80 ms once) times both, and
MKL is taken only when clearly faster (`MKL_MARGIN`) in two probes in a row. The choice holds for the process
(`cpu_matmul()`, logged at debug) and is kept per CPU model and PyTorch version in the cache folder (`choice_file()`),
so every later process on the machine computes with the same library (a resumed job's rows equal the first run's to
the last bit). `BLIP_CPU_MATMUL=mkl` (or `aten`) turns the oneDNN path off, `BLIP_CPU_MATMUL=onednn` forces it
(on non-x86 CPUs too); inside `aten_linears()` every product takes `F.linear` (tracing for ONNX export: the oneDNN
op has no ONNX form).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

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


# (rows, in, out, weights): a ViT-B MLP product at 64 rows (compute-bound), and batch-1 decoding GEMVs over 4
# weights (38 MB: past a 32 MB L3, so they read memory as decoding does; a cache-resident GEMV ranks them wrongly)
PROBE_SHAPES = ((64, 768, 3072, 1), (1, 768, 3072, 4))
PROBE_REPEATS = 5  # timed runs per shape and library (the best counts), after one warm-up run
CHOICE_FILE = "cpu_matmul.json"
MKL_MARGIN = 0.9  # MKL is picked only when it takes at most 90% of oneDNN's time: a near tie keeps the default


@dataclass(frozen=True)
class MatmulChoice:
    """Which library this process's CPU linears use (float32/bfloat16), and why."""

    library: str  # "onednn" (torch.ops.mkldnn._linear_pointwise) or "mkl" (F.linear)
    reason: str  # "BLIP_CPU_MATMUL=mkl", "probe", "default (probe failed: ...)", "not x86", ...
    probe_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)  # library -> best ms per PROBE_SHAPES

    def describe(self) -> str:
        timings = "; ".join(
            f"{name} " + " / ".join(f"{ms:.2f}" for ms in times) + " ms" for name, times in self.probe_ms.items()
        )
        return f"{self.library} ({self.reason}{': ' + timings if timings else ''})"


def probe_matmul(shapes: tuple[tuple[int, int, int, int], ...] = PROBE_SHAPES) -> dict[str, tuple[float, ...]]:
    """Best-of-`PROBE_REPEATS` milliseconds of each library's products for each shape (x [rows, in] times each of
    `weights` W^T [in, out]) on one thread, in CPU time (so neither the thread count nor a busy machine's
    preemptions change the verdict: with 2 threads on 2 busy cores oneDNN's GEMV measured 20x slower than alone, MKL's
    not), the libraries interleaved so that memory-bandwidth contention slows both alike."""
    times: dict[str, list[float]] = {"onednn": [], "mkl": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core, in this thread's CPU time: what a busy machine does not change
    try:
        _time_products(shapes, times)
    finally:
        torch.set_num_threads(threads)
    return {name: tuple(values) for name, values in times.items()}


def _time_products(shapes: tuple[tuple[int, int, int, int], ...], times: dict[str, list[float]]) -> None:
    clock = time.thread_time
    products = {
        "onednn": lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
        "mkl": lambda x, w, b: F.linear(x, w, b),
    }
    with torch.inference_mode():
        for rows, fan_in, fan_out, copies in shapes:
            x = torch.full((rows, fan_in), 0.5)
            weights = [torch.full((fan_out, fan_in), 0.01) for _ in range(copies)]
            bias = torch.zeros(fan_out)
            best = {name: float("inf") for name in products}
            for repeat in range(PROBE_REPEATS + 1):
                for name, product in products.items():
                    start = clock()
                    for w in weights:
                        product(x, w, bias)
                    elapsed = (clock() - start) * 1e3
                    if repeat:  # the first run warms up (oneDNN builds its kernel, pages fault in)
                        best[name] = min(best[name], elapsed)
            for name in products:
                times[name].append(best[name])


_probe = probe_matmul  # what `cpu_matmul` times with (tests put a fake one here)


def pick_library(probe_ms: dict[str, tuple[float, ...]]) -> str:
    """ "mkl" when MKL's time is at most `MKL_MARGIN` of oneDNN's (geometric mean over the shapes), else "onednn"."""
    ratios = [mkl / onednn for mkl, onednn in zip(probe_ms["mkl"], probe_ms["onednn"])]
    if not ratios or not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"unusable probe timings {probe_ms}")
    return "mkl" if math.exp(sum(map(math.log, ratios)) / len(ratios)) <= MKL_MARGIN else "onednn"


_choosing = threading.Lock()  # threads at their first CPU linear together: one probes, the others read its verdict


@functools.cache
def cpu_matmul() -> MatmulChoice:
    """This process's choice (made once, at the first CPU linear): `BLIP_CPU_MATMUL` (onednn, mkl; aten = mkl) when
    set, else on x86 the faster library by a short probe; oneDNN when the probe fails (the default before probing
    existed), MKL where the oneDNN op is missing or disagrees with `F.linear`, and on non-x86 CPUs."""
    setting = _setting()
    if setting not in ("auto", "onednn", "mkl", "aten"):
        raise ValueError(f"BLIP_CPU_MATMUL must be auto, onednn or mkl (aten: the same as mkl), got {setting!r}")
    with _choosing:  # the probe sets the process's thread count: two at once would leave it at 1
        choice = _choose(setting)
    _logger.debug("CPU linears: %s", choice.describe())
    return choice


def _setting() -> str:
    """`BLIP_CPU_MATMUL`, lower case ("auto" when unset or empty); `cpu_matmul` checks it."""
    return os.environ.get("BLIP_CPU_MATMUL", "auto").strip().lower() or "auto"


def _choose(setting: str) -> MatmulChoice:
    if setting in ("mkl", "aten"):
        return MatmulChoice("mkl", f"BLIP_CPU_MATMUL={setting}")
    if not _onednn_works():
        return MatmulChoice("mkl", "the oneDNN linear op is missing or disagrees with F.linear")
    if setting == "onednn":
        return MatmulChoice("onednn", "BLIP_CPU_MATMUL=onednn")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return MatmulChoice("mkl", f"not x86 ({platform.machine()})")
    key = machine_key()
    remembered = _remembered(key)
    if remembered is not None:
        return remembered
    try:
        probe_ms = _probe()
        if pick_library(probe_ms) != "onednn":
            probe_ms = _probe()  # leaving the default takes two probes that agree (a busy neighbour skews one)
        choice = MatmulChoice(pick_library(probe_ms), "probe", probe_ms)
    except Exception as e:  # a probe that cannot run must not stop inference: keep the default
        return MatmulChoice("onednn", f"default (probe failed: {type(e).__name__}: {e})")
    _remember(key, choice)
    return choice


def machine_key() -> str:
    """What the choice is kept by: the CPU model and the PyTorch build (not the thread count: every process on the
    machine should agree, whatever threads it runs)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | torch {torch.__version__}"


def choice_file() -> Path:
    """Where probed choices are kept, per machine key: `$BLIP_CACHE_DIR`, else `$XDG_CACHE_HOME/blip`, else
    `~/.cache/blip` (as `blip.weights.fingerprint`), file `cpu_matmul.json`."""
    if os.environ.get("BLIP_CACHE_DIR"):
        return Path(os.environ["BLIP_CACHE_DIR"]).expanduser() / CHOICE_FILE
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "blip" / CHOICE_FILE


def _remembered(key: str) -> MatmulChoice | None:
    try:
        entry = json.loads(choice_file().read_text(encoding="utf-8"))[key]
        library = entry["library"]
        probe_ms = {name: tuple(float(t) for t in times) for name, times in entry["probe_ms"].items()}
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError):  # RuntimeError: no home folder
        return None
    return MatmulChoice(library, "probed before", probe_ms) if library in ("onednn", "mkl") else None


def _remember(key: str, choice: MatmulChoice) -> None:
    """Keep the choice for every later process on this machine (so that all of them, e.g. a job and its resumed
    run, compute with the same library: the same results to the last bit). A cache that cannot be written is
    skipped."""
    try:
        path = choice_file()
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        known[key] = {"library": choice.library, "probe_ms": {k: list(v) for k, v in choice.probe_ms.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(known, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except (OSError, RuntimeError):  # RuntimeError: Path.expanduser finds no home folder
        pass


def onednn_linear_available() -> bool:
    """Whether CPU linears go to oneDNN in this process (`cpu_matmul`)."""
    return cpu_matmul().library == "onednn"


@functools.cache  # a property of this PyTorch build: one check per process, not one per `pack_linears` call
def _onednn_works() -> bool:
    """The op exists on this build and agrees with `F.linear` (it is internal to PyTorch: inductor uses it)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
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
        and not torch.compiler.is_compiling()  # torch.compile: inductor fuses F.linear itself (no lowering for the op)
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
            if self.training and torch.is_grad_enabled():  # a packed weight is frozen: training it would do nothing
                raise RuntimeError(
                    "this model's linear weights are packed for CPU inference (blip.load packs them): call "
                    "blip.models.kernels.unpack_linears(model) before training it"
                )
            return _packed_linear(x, self.weight, self.bias, gelu)
        if self._packed_copy is not None:
            copy, version = self._packed_copy
            if version != self.weight._version:  # the shared matrix changed in place since: the copy is stale
                self._packed_copy = None
            elif not (torch.is_grad_enabled() and self.weight.requires_grad):
                return _packed_linear(x, copy, self.bias, gelu)
        return linear(x, self.weight, self.bias, gelu)

    # A weight shared with an embedding (a tied output head) stays a plain matrix; `pack_linears` may give the
    # module a packed copy of it for inference, with the matrix's version counter at that time.
    _packed_copy: tuple[torch.Tensor, int] | None = None

    def unpack(self) -> None:
        """Back to a plain weight matrix (a no-op when it is not packed)."""
        self._packed_copy = None
        if self.weight.is_mkldnn:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=self._plain_requires_grad)

    def __getstate__(self) -> dict:  # pickle and deepcopy: a packed weight has no storage; copies get the plain one
        state = self.__dict__.copy()
        state.pop("_packed_copy", None)
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
    not shared with another module; a bfloat16 weight shared with an embedding (a tied output head) stays plain
    and the module gets a packed copy of it (used until the matrix changes in place). Returns how many linears
    compute from packed weights. float32 weights are packed only where oneDNN is this process's library (`cpu_matmul`);
    bfloat16 ones wherever oneDNN works (`F.linear` sends bfloat16 to oneDNN too, unpacked) unless
    BLIP_CPU_MATMUL=mkl/aten asks for `F.linear` everywhere."""
    if _setting() in ("mkl", "aten") or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not _onednn_works():
        return 0
    dtypes = _DTYPES if cpu_matmul().library == "onednn" else (torch.bfloat16,)
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
            or module._packed_copy is not None
            or weight.device.type != "cpu"
            or weight.dtype not in dtypes
            or (module.bias is not None and module.bias.dtype != weight.dtype)
        ):
            continue
        if uses.get(id(weight), 0) != 1:  # tied: bfloat16 batch-1 products gain 2-3x from a packed copy, float32 none
            if weight.dtype == torch.bfloat16:
                with torch.no_grad():
                    module._packed_copy = (torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), weight._version)
                packed += 1
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
