"""`blip.models.kernels.pack_linears`: oneDNN-packed weights give the same numbers and behave like plain ones
everywhere a module's weights are read (state dict, copies, casts, gradients, tied heads)."""

from __future__ import annotations

import copy
import io
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip.models import kernels
from blip.models.kernels import Linear, aten_linears, onednn_linear_available, pack_linears, unpack_linears

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="oneDNN linears are off on this machine")


def _layers(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Linear(64, 96), Linear(96, 32, bias=False)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 64), (0, 64), (257, 64)])
@pytest.mark.parametrize("gelu", [False, True])
def test_packed_outputs_are_bit_identical(dtype: torch.dtype, shape: tuple[int, ...], gelu: bool) -> None:
    plain = _layers(dtype)
    packed = copy.deepcopy(plain)
    assert pack_linears(packed) == 2 and all(layer.weight.is_mkldnn for layer in packed)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        want, got = plain[1](plain[0](x, gelu=gelu)), packed[1](packed[0](x, gelu=gelu))
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_pack_frees_the_plain_matrix_and_keeps_shape_dtype_device() -> None:
    layers = _layers(torch.bfloat16)
    old = weakref.ref(layers[0].weight)
    pack_linears(layers)
    assert old() is None  # no second copy of the model stays alive
    weight = layers[0].weight
    assert (weight.shape, weight.dtype, weight.device.type) == (torch.Size([96, 64]), torch.bfloat16, "cpu")


def test_state_dict_copies_pickles_and_casts_see_the_plain_matrix() -> None:
    plain = _layers(torch.bfloat16)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    state = packed.state_dict()
    assert not any(t.is_mkldnn for t in state.values())
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())

    twin = copy.deepcopy(packed)  # a plain copy with the same weights; the original stays packed
    assert packed[0].weight.is_mkldnn and not twin[0].weight.is_mkldnn
    assert torch.equal(twin[0].weight, plain[0].weight)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    assert torch.equal(pickle.loads(pickle.dumps(packed))[1].weight, plain[1].weight)

    fresh = _layers(torch.bfloat16)
    with torch.no_grad():
        fresh[0].weight.zero_()
    pack_linears(fresh)
    fresh.load_state_dict(plain.state_dict())  # loading into a packed module unpacks it first
    assert torch.equal(fresh[0].weight, plain[0].weight)

    packed.float()  # casting (or .to(device)) unpacks: packed tensors have no such ops
    assert not packed[0].weight.is_mkldnn and packed[0].weight.dtype == torch.float32
    assert packed[0].weight.requires_grad  # as it was before packing
    torch.testing.assert_close(packed[0].weight, plain[0].weight.float())


def test_tied_weights_stay_plain() -> None:
    embedding = nn.Embedding(50, 16)
    head = Linear(16, 50, bias=False)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head, "other": Linear(16, 16)})
    assert pack_linears(model) == 1
    assert not head.weight.is_mkldnn and model["other"].weight.is_mkldnn
    assert pack_linears(model) == 0  # packing twice changes nothing


def test_where_mkl_is_chosen_only_bfloat16_is_packed_and_forcing_mkl_packs_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kernels, "cpu_matmul", lambda: kernels.MatmulChoice("mkl", "probe"))
    fp32, bf16 = _layers(torch.float32), _layers(torch.bfloat16)
    assert pack_linears(fp32) == 0 and not fp32[0].weight.is_mkldnn  # MKL computes float32 there: keep it plain
    assert pack_linears(bf16) == 2  # bfloat16 goes to oneDNN whatever the choice: packed it is faster
    for setting in ("mkl", "aten"):
        monkeypatch.setenv("BLIP_CPU_MATMUL", setting)
        assert pack_linears(_layers(torch.bfloat16)) == 0


def test_input_gradients_through_packed_weights_equal_plain_ones() -> None:
    plain = _layers(torch.float32)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    packed.eval()  # as Grad-CAM runs it: gradients for the input of a model in eval mode
    x1 = torch.randn(4, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    plain[1](plain[0](x1, gelu=True)).pow(2).sum().backward()
    packed[1](packed[0](x2, gelu=True)).pow(2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


def test_aten_mode_and_autocast_compute_with_the_plain_matrix() -> None:
    plain = _layers(torch.float32)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    x = torch.randn(2, 64)
    with torch.no_grad(), aten_linears():
        torch.testing.assert_close(packed[0](x), F.linear(x, plain[0].weight, plain[0].bias))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(packed[0](x).float(), plain[0](x).float(), rtol=2e-2, atol=2e-2)


def test_unpack_linears_restores_plain_weights() -> None:
    plain = _layers(torch.bfloat16)
    packed = copy.deepcopy(plain)
    pack_linears(packed)
    unpack_linears(packed)
    assert not any(p.is_mkldnn for p in packed.parameters())
    assert all(torch.equal(a, b) for a, b in zip(packed.parameters(), plain.parameters(), strict=True))


def test_blip_load_packs_on_cpu_and_answers_as_the_plain_model(hf_checkpoints) -> None:
    import blip

    folder = hf_checkpoints(kind="caption")
    ours = blip.load(folder)
    layers = [m for m in ours.model.modules() if isinstance(m, Linear)]
    assert sum(m.weight.is_mkldnn for m in layers) >= len(layers) - 1  # all but a tied output head
    plain = blip.load(folder)
    unpack_linears(plain.model)
    image = torch.rand(3, 40, 40)
    from PIL import Image

    picture = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    [got], [want] = ours.caption(picture, num_beams=2), plain.caption(picture, num_beams=2)
    assert got.token_ids == want.token_ids and got.score == want.score
    saved = ours.model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in plain.model.state_dict().items())


def test_training_a_packed_model_is_refused_until_it_is_unpacked() -> None:
    layers = _layers(torch.float32)
    pack_linears(layers)
    layers.train()
    with pytest.raises(RuntimeError, match="unpack_linears"):
        layers[0](torch.randn(2, 64))
    with torch.no_grad():
        layers[0](torch.randn(2, 64))  # train mode without gradients (e.g. an evaluation inside a loop) still runs
    unpack_linears(layers)
    layers[1](layers[0](torch.randn(2, 64))).sum().backward()
    assert layers[0].weight.grad is not None and layers[0].bias.grad is not None


def test_a_tied_bfloat16_head_computes_from_a_packed_copy_until_its_matrix_changes() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 16).to(torch.bfloat16)
    head = Linear(16, 50, bias=False).to(torch.bfloat16)
    head.weight = embedding.weight
    model = nn.ModuleDict({"embed": embedding, "head": head})
    assert pack_linears(model) == 1
    assert not head.weight.is_mkldnn and head._packed_copy is not None  # the embedding still reads the matrix
    x = torch.randn(3, 16).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(head(x), F.linear(x, embedding.weight))
    with torch.no_grad():
        embedding.weight.mul_(2)  # in place: the copy is stale from here on
    with torch.inference_mode():
        assert torch.equal(head(x), F.linear(x, embedding.weight))
    assert head._packed_copy is None
    pack_linears(model)
    assert copy.deepcopy(model)["head"]._packed_copy is None and pickle.loads(pickle.dumps(head))._packed_copy is None
    model.float()
    assert head._packed_copy is None and head.weight.dtype == torch.float32
