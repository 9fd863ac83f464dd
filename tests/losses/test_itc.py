"""ITC: the loss formula on hand-made tensors, momentum distillation targets, queues, momentum update, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip.losses.itc import NO_IMAGE, ContrastiveLoss, MomentumEncoder, contrastive_loss


def test_contrastive_loss_hand_computed():
    # Two orthonormal features, banks = identity, temp 1: each row's softmax over [1, 0] puts e/(e+1) on the positive.
    feats = torch.eye(2)
    targets = torch.eye(2)
    loss = contrastive_loss(feats, feats, torch.eye(2), torch.eye(2), targets, targets, 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # 0.3133


def test_contrastive_loss_soft_targets_and_temperature():
    # One row, candidates with similarities [1, 0] at temp 0.5 -> logits [2, 0]; targets [0.8, 0.2].
    image = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0]])
    bank = torch.eye(2)
    targets_i2t = torch.tensor([[0.8, 0.2]])
    targets_t2i = torch.tensor([[0.0, 1.0]])
    loss = contrastive_loss(image, text, bank, bank, targets_i2t, targets_t2i, 0.5)
    log_z = math.log(math.exp(2) + 1)
    i2t = -(0.8 * (2 - log_z) + 0.2 * (0 - log_z))  # text row: logits [0, 2], positive at 1
    t2i = -(2 - log_z)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def _reference_itc(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
    """The ITC loss written out row by row (no shared code with the module)."""
    batch = image_feat.shape[0]
    text_bank = torch.cat([text_feat_m, text_queue.T])  # candidates as rows
    image_bank = torch.cat([image_feat_m, image_queue.T])
    total = 0.0
    for feats, feats_m, bank in ((image_feat, image_feat_m, text_bank), (text_feat, text_feat_m, image_bank)):
        for i in range(batch):
            logits = [float(feats[i] @ c) / temp for c in bank]
            logits_m = [float(feats_m[i] @ c) / temp for c in bank]
            z, z_m = math.log(sum(math.exp(x) for x in logits)), math.log(sum(math.exp(x) for x in logits_m))
            for j in range(len(bank)):
                target = alpha * math.exp(logits_m[j] - z_m) + (1 - alpha) * (1.0 if j == i else 0.0)
                total -= target * (logits[j] - z) / batch
    return total / 2


def test_module_matches_written_out_formula(make_model, text_batch):
    model = make_model()
    loss_fn = ContrastiveLoss(model, embed_dim=model.config.embed_dim, queue_size=6, temp=0.1, alpha=0.4).train()
    ids, mask = text_batch
    pixels = torch.randn(4, 3, 32, 32)
    image_feat = model.image_features(model.encode_image(pixels))
    text_feat = model.text_features(model.encode_text(ids, mask))
    queue_i, queue_t = loss_fn.image_queue.clone(), loss_fn.text_queue.clone()
    with torch.no_grad():
        image_feat_m = loss_fn.momentum_encoder.image_features(pixels)
        text_feat_m = loss_fn.momentum_encoder.text_features(ids, mask)
    out = loss_fn(image_feat, text_feat, pixels, ids, mask)
    expected = _reference_itc(
        image_feat.detach(), text_feat.detach(), image_feat_m, text_feat_m, queue_i, queue_t, 0.1, 0.4
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert loss_fn.temp.grad is not None and model.vision_proj.weight.grad is not None
    # the momentum copy is the online model (nothing updated yet), so its features equal the online ones
    assert torch.allclose(image_feat_m, image_feat, atol=1e-6)


def test_queue_starts_normalised_and_enqueue_wraps():
    loss_fn = ContrastiveLoss(_ProjOnly(), embed_dim=3, queue_size=5, use_idx=True)
    assert torch.allclose(loss_fn.image_queue.norm(dim=0), torch.ones(5))
    assert torch.allclose(loss_fn.text_queue.norm(dim=0), torch.ones(5))
    assert (loss_fn.idx_queue == NO_IMAGE).all()
    feats = F.normalize(torch.randn(3, 3), dim=1)
    loss_fn.enqueue(feats, -feats, torch.tensor([7, 8, 9]))
    assert int(loss_fn.queue_ptr) == 3
    assert torch.equal(loss_fn.image_queue[:, :3], feats.T) and torch.equal(loss_fn.text_queue[:, :3], -feats.T)
    more = F.normalize(torch.randn(3, 3), dim=1)
    loss_fn.enqueue(more, more, torch.tensor([1, 2, 3]))  # slots 3, 4, then wraps to 0
    assert int(loss_fn.queue_ptr) == 1
    assert torch.equal(loss_fn.image_queue[:, 3:5], more[:2].T)
    assert torch.equal(loss_fn.image_queue[:, 0], more[2])
    assert loss_fn.idx_queue.tolist() == [[3, 8, 9, 1, 2]]


def test_forward_enqueues_the_momentum_features_only_when_training(make_model, text_batch):
    model = make_model()
    loss_fn = ContrastiveLoss(model, embed_dim=model.config.embed_dim, queue_size=8)
    ids, mask = text_batch
    pixels = torch.randn(4, 3, 32, 32)
    feats = (model.image_features(model.encode_image(pixels)), model.text_features(model.encode_text(ids, mask)))
    loss_fn.eval()
    before = loss_fn.image_queue.clone()
    loss_fn(*feats, pixels, ids, mask)
    assert torch.equal(loss_fn.image_queue, before) and int(loss_fn.queue_ptr) == 0
    loss_fn.train()
    out = loss_fn(*feats, pixels, ids, mask)
    assert int(loss_fn.queue_ptr) == 4
    assert torch.allclose(loss_fn.image_queue[:, :4], out.image_feat_m_all.T)
    assert torch.allclose(loss_fn.text_queue[:, :4], out.text_feat_m_all.T)
    assert torch.equal(loss_fn.image_queue[:, 4:], before[:, 4:])


def test_retrieval_mode_gathers_ids_and_requires_them(make_model, text_batch):
    model = make_model()
    loss_fn = ContrastiveLoss(model, embed_dim=model.config.embed_dim, queue_size=8, use_idx=True).train()
    ids, mask = text_batch
    pixels = torch.randn(4, 3, 32, 32)
    image_feat = model.image_features(model.encode_image(pixels))
    text_feat = model.text_features(model.encode_text(ids, mask))
    out = loss_fn(image_feat, text_feat, pixels, ids, mask, idx=torch.tensor([5, 5, 6, 7]))
    assert out.idx_all.tolist() == [5, 5, 6, 7]
    assert loss_fn.idx_queue[0, :4].tolist() == [5, 5, 6, 7]
    with pytest.raises(ValueError, match="needs image ids"):
        loss_fn(image_feat, text_feat, pixels, ids, mask)


def test_retrieval_loss_value_with_idx_targets():
    # Direct check of the target construction: row image 5 vs candidates [5, 6, 5(queue)] at temp 1, alpha 0.
    model = _ProjOnly()
    loss_fn = ContrastiveLoss(model, embed_dim=2, queue_size=1, temp=0.5, alpha=0.0, use_idx=True)
    loss_fn.image_queue.copy_(torch.tensor([[1.0], [0.0]]))
    loss_fn.text_queue.copy_(torch.tensor([[1.0], [0.0]]))
    loss_fn.idx_queue.fill_(5)
    pixels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the stub's "images" are their own features
    ids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = loss_fn(pixels, ids, pixels, ids, None, idx=torch.tensor([5, 6]))
    # row 0: logits [2, 0, 2], positives {0, 2} -> targets [.5, 0, .5]; row 1: logits [0, 2, 0], positive {1}
    z0 = math.log(2 * math.exp(2) + 1)
    row0 = -(0.5 * (2 - z0) + 0.5 * (2 - z0))
    row1 = -(2 - math.log(math.exp(2) + 2))
    assert out.loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-5)  # i2t == t2i here


def test_temperature_is_clamped(make_model, text_batch):
    model = make_model()
    ids, mask = text_batch
    pixels = torch.randn(4, 3, 32, 32)
    for start, expected in ((1.0, 0.5), (1e-5, 0.001), (0.07, 0.07)):
        loss_fn = ContrastiveLoss(model, embed_dim=model.config.embed_dim, queue_size=8)
        with torch.no_grad():
            loss_fn.temp.fill_(start)
        image_feat = model.image_features(model.encode_image(pixels))
        text_feat = model.text_features(model.encode_text(ids, mask))
        out = loss_fn(image_feat, text_feat, pixels, ids, mask)
        assert loss_fn.temp.item() == pytest.approx(expected) and out.temp.item() == pytest.approx(expected)


def test_momentum_update(make_model):
    model = make_model()
    momentum = MomentumEncoder(model)
    assert all(not p.requires_grad for p in momentum.parameters())
    online = dict(model.named_parameters())
    for name, p_m in momentum.named_parameters():
        assert torch.equal(p_m, online[name])
    before = {n: p.clone() for n, p in momentum.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    momentum.update(model, 0.995)
    for name, p_m in momentum.named_parameters():
        expected = 0.995 * before[name] + 0.005 * online[name]
        assert torch.allclose(p_m, expected, atol=1e-7), name
    momentum.update(model, 0.0)  # m = 0 copies
    for name, p_m in momentum.named_parameters():
        assert torch.equal(p_m, online[name])


class _ProjOnly(torch.nn.Module):
    """A stand-in model whose 'images' and 'texts' are already features (identity encoders and projections)."""

    def __init__(self):
        super().__init__()
        self.vision_model = _Seq()
        self.text_encoder = _Seq()
        self.vision_proj = torch.nn.Identity()
        self.text_proj = torch.nn.Identity()


class _Seq(torch.nn.Module):
    def forward(self, x, mask=None, first_only=False):
        return x[:, None, :]  # (B, 1, D): position 0 is the feature
