"""ITM: hard-negative weights and sampling (never the positive), the ITM batch and its loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip.losses.itc import ITCOutput
from blip.losses.itm import MatchingLoss, negative_weights, pad_to, sample_negatives


def test_negative_weights_hand_computed():
    sim = torch.tensor([[1.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weights = negative_weights(sim, torch.eye(3, dtype=torch.bool), eps=1e-4)
    z = math.e + 1 + 2  # row 0: softmax of [1, 0, log 2]
    assert weights[0].tolist() == pytest.approx([0.0, 1 / z + 1e-4, 2 / z + 1e-4])
    assert weights[1].tolist() == pytest.approx([1 / 3 + 1e-4, 0.0, 1 / 3 + 1e-4])
    assert torch.all(weights.diagonal() == 0)


def test_rows_without_negative_mass_fall_back_to_uniform_over_non_positives():
    sim = torch.tensor([[50.0, -50.0, -50.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weights = negative_weights(sim * 100, torch.eye(3, dtype=torch.bool))  # row 0 underflows to one-hot on itself
    assert weights[0, 0] == 0 and weights[0, 1:].sum() > 0
    same_image = torch.ones(2, 2, dtype=torch.bool)  # every candidate is a positive: nothing to sample
    with pytest.raises(ValueError, match="no possible negative"):
        sample_negatives(negative_weights(torch.zeros(2, 2), same_image))


@pytest.mark.parametrize("seed", range(5))
def test_sampling_never_picks_a_positive(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 12
    idx = torch.randint(0, 5, (n,), generator=generator)  # several captions per image
    positive = idx[:, None] == idx[None, :]
    keep = (~positive).any(1)  # rows that have at least one negative
    sim = torch.randn(n, n, generator=generator) * 10
    sim = sim + 20 * positive  # positives are by far the most similar: the sampler must still avoid them
    weights = negative_weights(sim, positive)[keep]
    for _ in range(200):
        picked = sample_negatives(weights, generator)
        assert not positive[keep][torch.arange(len(picked)), picked].any()


def test_sampling_follows_the_softmax():
    sim = torch.tensor([[0.0, math.log(3.0), 0.0, math.log(6.0)]])
    positive = torch.tensor([[True, False, False, False]])
    weights = negative_weights(sim, positive)  # negatives 3 : 1 : 6
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(weights.expand(20000, -1), 1, replacement=True, generator=generator).squeeze(1)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[0] == 0
    assert freq[1:].tolist() == pytest.approx([0.3, 0.1, 0.6], abs=0.015)


def test_pad_to():
    ids, mask = torch.tensor([[2, 5, 3]]), torch.tensor([[1, 1, 1]])
    padded_ids, padded_mask = pad_to(ids, mask, 5, pad_id=0)
    assert padded_ids.tolist() == [[2, 5, 3, 0, 0]] and padded_mask.tolist() == [[1, 1, 1, 0, 0]]
    assert pad_to(ids, mask, 2, 0)[0] is ids


def _itc_output(batch: int, dim: int, idx=None) -> ITCOutput:
    torch.manual_seed(1)
    feats = [F.normalize(torch.randn(batch, dim), dim=1) for _ in range(4)]
    return ITCOutput(torch.tensor(0.0), *feats, idx_all=idx, temp=torch.tensor(0.07))


def test_matching_loss_builds_positives_and_two_negatives_per_pair(make_model, text_batch):
    model = make_model()
    ids, mask = text_batch
    image_embeds = model.encode_image(torch.randn(4, 3, 32, 32))
    itc = _itc_output(4, model.config.embed_dim)
    loss_fn = MatchingLoss(use_momentum=True, seed=3).train()
    neg_images, neg_texts = loss_fn.pick_negatives(itc, 4)  # draw 0
    assert not (neg_images == torch.arange(4)).any() and not (neg_texts == torch.arange(4)).any()
    loss_fn.calls = 0
    loss = loss_fn(model, image_embeds, ids, mask, itc)  # replays draw 0
    assert loss_fn.calls == 1
    # The same ITM batch built by hand: (i, t_i), (neg image of t_i, t_i), (i, neg text of i).
    rows_ids = torch.cat([ids, ids, ids[neg_texts]])
    rows_mask = torch.cat([mask, mask, mask[neg_texts]])
    rows_images = torch.cat([image_embeds, image_embeds[neg_images], image_embeds])
    logits = model.itm_logits(model.encode_multimodal(rows_ids, rows_mask, rows_images))
    labels = torch.tensor([1] * 4 + [0] * 8)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    loss.backward()
    assert (
        model.itm_head.weight.grad is not None
        and model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    )


def test_written_negatives_are_more_negative_rows_of_their_owners_images(make_model, text_batch, tokenizer):
    model = make_model()
    ids, mask = text_batch
    image_embeds = model.encode_image(torch.randn(4, 3, 32, 32))
    itc = _itc_output(4, model.config.embed_dim)
    w_ids, w_mask = tokenizer(
        ["a green circle on the left", "three shapes: a blue square and a red star"], max_length=30
    )
    owner = torch.tensor([0, 2])
    loss_fn = MatchingLoss(use_momentum=True, seed=3).train()
    neg_images, neg_texts = loss_fn.pick_negatives(itc, 4)
    loss_fn.calls = 0
    loss = loss_fn(model, image_embeds, ids, mask, itc, 0, (w_ids, w_mask, owner))
    # By hand: the mined rows as without, then (image of the owner, written text) rows, all texts padded alike.
    length = max(ids.shape[1], w_ids.shape[1])
    padded = [pad_to(i, m, length, 0) for i, m in ((ids, mask), (ids[neg_texts], mask[neg_texts]), (w_ids, w_mask))]
    rows_ids = torch.cat([padded[0][0], padded[0][0], padded[1][0], padded[2][0]])
    rows_mask = torch.cat([padded[0][1], padded[0][1], padded[1][1], padded[2][1]])
    rows_images = torch.cat([image_embeds, image_embeds[neg_images], image_embeds, image_embeds[owner]])
    logits = model.itm_logits(model.encode_multimodal(rows_ids, rows_mask, rows_images))
    labels = torch.tensor([1] * 4 + [0] * 10)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    loss_fn.calls = 0
    assert loss.item() != pytest.approx(loss_fn(model, image_embeds, ids, mask, itc).item(), rel=1e-3)


def test_draws_are_reproducible_from_the_call_counter():
    itc = _itc_output(6, 8)
    a, b = MatchingLoss(seed=7).train(), MatchingLoss(seed=7).train()
    first = [a.pick_negatives(itc, 6) for _ in range(3)]
    b.calls = 1
    assert torch.equal(b.pick_negatives(itc, 6)[0], first[1][0])
    assert not all(torch.equal(first[0][0], f[0]) for f in first[1:])  # the counter moves the draws


def test_retrieval_variant_excludes_every_caption_of_the_same_image():
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    itc = _itc_output(6, 8, idx=idx)
    loss_fn = MatchingLoss(use_momentum=False, eps=0.0, seed=0).train()
    for _ in range(50):
        neg_images, neg_texts = loss_fn.pick_negatives(itc, 6)
        assert not (idx[neg_images] == idx).any() and not (idx[neg_texts] == idx).any()
