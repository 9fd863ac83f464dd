"""Retrieval Recall@K: hand-made score matrices, and the vectorised ranks against a brute-force sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip.evaluation import recall_at_k, retrieval_ranks


def _brute_force(
    scores: np.ndarray, txt2img: list[int], img2txts: list[list[int]], scores_t2i: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """BLIP's itm_eval loop, with ties broken by index (stable descending sort)."""
    st = scores.T if scores_t2i is None else scores_t2i
    i2t = []
    for i, row in enumerate(scores):
        order = list(np.argsort(-row, kind="stable"))
        i2t.append(min(order.index(j) for j in img2txts[i]))
    t2i = []
    for j, row in enumerate(st):
        order = list(np.argsort(-row, kind="stable"))
        t2i.append(order.index(txt2img[j]))
    return np.array(i2t), np.array(t2i)


def _layout(n_img: int, per_image: int) -> tuple[list[int], list[list[int]]]:
    txt2img = [j // per_image for j in range(n_img * per_image)]
    img2txts = [list(range(i * per_image, (i + 1) * per_image)) for i in range(n_img)]
    return txt2img, img2txts


def test_hand_made_matrix() -> None:
    # 3 images x 6 captions, captions 2i and 2i+1 belong to image i.
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its caption 0 is first                     -> i2t rank 0
            [0.9, 0.8, 0.7, 0.1, 0.6, 0.2],  # image 1: captions 2 (0.7) and 3 (0.1); 2 is 3rd    -> i2t rank 2
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.0],  # image 2: captions 4 (0.5) first                     -> i2t rank 0
        ]
    )
    txt2img, img2txts = _layout(3, 2)
    # t2i (columns; caption j belongs to image j // 2):
    #   caption 0: images 0 and 1 tie at 0.9, image 0 has the lower index  -> rank 0
    #   caption 1: 0.8 (image 1) > 0.2 (image 2) > 0.1 (image 0)           -> rank 2
    #   caption 2: 0.8 (image 0) > 0.7 (image 1)                           -> rank 1
    #   caption 3: 0.4 (image 2) > 0.1 (image 1)                           -> rank 1
    #   caption 4: 0.6 (image 1) > 0.5 (image 2)                           -> rank 1
    #   caption 5: 0.2 (image 1), then images 0 and 2 tie at 0.0: index 0 first -> rank 2
    i2t, t2i = retrieval_ranks(scores, txt2img, img2txts)
    assert i2t.tolist() == [0, 2, 0]
    assert t2i.tolist() == [0, 2, 1, 1, 1, 2]
    r = recall_at_k(scores, txt2img, img2txts, ks=(1, 2, 3))
    assert r["tr_r1"] == pytest.approx(200 / 3) and r["tr_r2"] == pytest.approx(200 / 3) and r["tr_r3"] == 100.0
    assert r["ir_r1"] == pytest.approx(100 / 6) and r["ir_r2"] == pytest.approx(400 / 6) and r["ir_r3"] == 100.0
    assert r["tr_mean"] == pytest.approx((200 / 3 + 200 / 3 + 100) / 3)
    assert r["r_mean"] == pytest.approx((r["tr_mean"] + r["ir_mean"]) / 2)


def test_default_keys_and_perfect_scores() -> None:
    txt2img, img2txts = _layout(4, 5)
    scores = np.full((4, 20), -1.0)
    for i, txts in enumerate(img2txts):
        scores[i, txts] = 1.0
    r = recall_at_k(scores, txt2img, img2txts)
    assert set(r) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "r_mean"}
    assert all(v == 100.0 for v in r.values())


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(1, 40))
    counts = rng.integers(1, 7, size=n_img)
    txt2img = rng.permutation(np.repeat(np.arange(n_img), counts)).tolist()
    img2txts = [[j for j, i in enumerate(txt2img) if i == img] for img in range(n_img)]
    if seed % 2:  # integer-valued scores: many ties
        scores = rng.integers(-2, 3, size=(n_img, len(txt2img))).astype(np.float32)
    else:
        scores = rng.standard_normal((n_img, len(txt2img)))
    scores_t2i = rng.standard_normal((len(txt2img), n_img)) if seed % 3 == 0 else None
    expected = _brute_force(scores, txt2img, img2txts, scores_t2i)
    for s in (scores, torch.from_numpy(scores)):
        i2t, t2i = retrieval_ranks(s, txt2img, img2txts, scores_t2i)
        np.testing.assert_array_equal(i2t, expected[0])
        np.testing.assert_array_equal(t2i, expected[1])
    r = recall_at_k(scores, txt2img, img2txts, scores_t2i=scores_t2i)
    assert r["tr_r5"] == pytest.approx(100 * np.mean(expected[0] < 5))
    assert r["ir_r10"] == pytest.approx(100 * np.mean(expected[1] < 10))


def test_chunked_path_on_a_larger_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    import blip.evaluation.retrieval_metrics as retrieval_metrics

    monkeypatch.setattr(retrieval_metrics, "_CHUNK_ELEMENTS", 4096)  # force many chunks
    rng = np.random.default_rng(0)
    txt2img, img2txts = _layout(60, 5)
    scores = rng.standard_normal((60, 300)).astype(np.float32)
    scores[:, ::7] = np.round(scores[:, ::7])  # some ties too
    got, expected = retrieval_ranks(scores, txt2img, img2txts), _brute_force(scores, txt2img, img2txts)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_input_validation() -> None:
    txt2img, img2txts = _layout(2, 2)
    scores = np.zeros((2, 4))
    with pytest.raises(ValueError, match="txt2img has 3"):
        recall_at_k(scores, txt2img[:3], img2txts)
    with pytest.raises(ValueError, match="image 1 has no"):
        recall_at_k(scores, txt2img, [[0, 1], []])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(scores, [0, 0, 1, 5], img2txts)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.zeros(4), txt2img, img2txts)
    with pytest.raises(ValueError, match="scores_t2i must have shape"):
        recall_at_k(scores, txt2img, img2txts, scores_t2i=np.zeros((2, 4)))
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(bad, txt2img, img2txts)


def test_coco_sized_layout() -> None:
    # COCO 5k test has 25,010 captions (a few images have 6); run a 1k x 5k slice of that layout quickly.
    rng = np.random.default_rng(0)
    txt2img, img2txts = _layout(1000, 5)
    scores = torch.from_numpy(rng.standard_normal((1000, 5000)).astype(np.float32))
    for i, txts in enumerate(img2txts):  # make the ground truth clearly best for 90% of the images
        if i % 10:
            scores[i, txts] += 10.0
    r = recall_at_k(scores, txt2img, img2txts)
    assert r["tr_r1"] == pytest.approx(90.0, abs=0.5)
    assert r["ir_r1"] == pytest.approx(90.0, abs=0.5)


@pytest.mark.slow
def test_full_size_10k_by_50k() -> None:
    txt2img, img2txts = _layout(10_000, 5)
    scores = torch.randn(10_000, 50_000)
    r = recall_at_k(scores, txt2img, img2txts)
    assert 0.0 <= r["r_mean"] < 1.0  # random scores: chance level
