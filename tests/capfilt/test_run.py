"""CapFilt end to end on a tiny captioner and filter: records, errors, the bootstrapped dataset, thresholds,
WebDataset input, batch-composition independence."""

from __future__ import annotations

import json

import pytest
import torch
from capfilt_helpers import bad_manifest, read_jsonl, records_bytes

from blip.capfilt import DATASET, CapfiltConfig, read_records, row_seed, run_capfilt
from blip.data.manifests import read_pairs, resolve_sources
from blip.jobs.writer import JobMismatchError

torch.set_num_threads(1)

FAST = dict(batch_size=4, shard_size=6, max_new_tokens=8, min_new_tokens=2, workers=0)


def _dataset_pairs(out):
    return read_pairs(resolve_sources(str(out / DATASET), "pretrain"))


def test_end_to_end_on_a_manifest_with_bad_rows(models, shapes_dir, tmp_path):
    captioner, filter_ = models
    manifest, bad = bad_manifest(shapes_dir, tmp_path / "data")
    out = tmp_path / "out"
    cfg = CapfiltConfig(num_captions=2, keep_clean=str(shapes_dir), **FAST)
    summary = run_capfilt(captioner, filter_, manifest, out, cfg, progress=False)

    inputs = read_jsonl(manifest)
    records = list(read_records(out))
    errors = read_jsonl(out / "errors.jsonl")
    # every input row exactly once: a record or an error, in input order
    assert [r["id"] for r in records] == [r["id"] for r in inputs if r["id"] not in bad]
    assert sorted(e["image"] for e in errors) == sorted(bad)
    assert all(e["error"] for e in errors) and any("no image" in e["error"] for e in errors)
    assert summary.rows == len(inputs) and summary.failed == len(bad) and summary.complete
    assert summary.exit_code == 1

    by_id = {r["id"]: r for r in inputs}
    for record in records:
        source = by_id[record["id"]]
        assert record["image"] == source["image"] and record["web_text"] == source["caption"]
        for key in ("noise", "noise_detail", "source", "scene"):  # input columns pass through unchanged
            assert record[key] == source[key]
        assert len(record["synthetic"]) == 2
        assert record["web_keep"] == (record["web_score"] >= cfg.threshold)
        for s in record["synthetic"]:
            assert 0.0 <= s["score"] <= 1.0 and s["keep"] == (bool(s["text"]) and s["score"] >= cfg.threshold)
            assert not s["text"].startswith("a picture of")  # the prompt is not part of the synthetic text

    # the bootstrapped dataset: kept web + kept synthetic texts, then the clean split unfiltered
    kept = [(r["id"], r["web_text"]) for r in records if r["web_keep"]]
    kept += [(r["id"], s["text"]) for r in records for s in r["synthetic"] if s["keep"]]
    rows = read_jsonl(out / DATASET)
    clean = read_jsonl(shapes_dir / "clean.jsonl")
    assert sorted((r["id"], r["caption"]) for r in rows if r["origin"] != "clean") == sorted(kept)
    assert sum(r["origin"] == "clean" for r in rows) == sum(len(c["captions"]) for c in clean) == summary.clean_texts
    assert summary.web_kept == sum(r["web_keep"] for r in records)
    assert summary.synthetic_kept == sum(s["keep"] for r in records for s in r["synthetic"])
    assert summary.texts_out == len(rows) == summary.web_kept + summary.synthetic_kept + summary.clean_texts
    assert summary.texts_in == summary.web_texts == len(records)

    pairs = _dataset_pairs(out)  # what `blip train` reads
    assert len(pairs) == len(rows)
    assert {p.text for p in pairs} >= {t for _, t in kept if t}

    info = json.loads((out / "summary.json").read_text())
    assert info["rows"] == summary.rows and "blip train" in info["train"]["command"]
    assert info["options"]["threshold"] == cfg.threshold


@pytest.mark.parametrize("threshold, kept", [(0.0, "all"), (1.01, "none")])
def test_threshold_keeps_all_or_none(models, shapes_dir, tmp_path, threshold, kept):
    captioner, filter_ = models
    out = tmp_path / "out"
    summary = run_capfilt(captioner, filter_, shapes_dir, out, CapfiltConfig(threshold=threshold, **FAST), False)
    records = list(read_records(out))
    assert len(records) == summary.rows == 24 and summary.failed == 0 and summary.exit_code == 0
    texts = summary.web_texts + summary.synthetic_texts
    assert texts == 2 * len(records)
    if kept == "all":
        assert summary.web_kept + summary.synthetic_kept == texts == summary.texts_out
        assert len(_dataset_pairs(out)) == texts
    else:
        assert summary.web_kept == summary.synthetic_kept == summary.texts_out == 0
        assert (out / DATASET).read_text() == ""


def test_webdataset_input_and_dataset_from_another_folder(models, shapes_dir, tmp_path, monkeypatch):
    captioner, filter_ = models
    out = tmp_path / "out"
    summary = run_capfilt(
        captioner, filter_, str(shapes_dir / "web-00000{0,1}.tar"), out, CapfiltConfig(threshold=0.0, **FAST), False
    )
    records = list(read_records(out))
    assert summary.rows == len(records) == 24
    assert records[0]["id"] == records[0]["image"] == "web-000000.tar/000000"
    web = read_jsonl(shapes_dir / "web.jsonl")
    assert [r["noise"] for r in records] == [w["noise"] for w in web]  # the .json members pass through
    assert [r["web_text"] for r in records] == [w["caption"] for w in web]
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere"
    out.rename(moved)  # images taken out of the shards are named relative to the dataset: it moves with them
    assert len(_dataset_pairs(moved)) == summary.texts_out == 48


def test_batch_composition_does_not_change_records(models, shapes_dir, tmp_path):
    captioner, filter_ = models
    outs = []
    for batch_size in (1, 8):
        out = tmp_path / f"b{batch_size}"
        cfg = CapfiltConfig(**{**FAST, "batch_size": batch_size, "shard_size": 24}, num_captions=2)
        run_capfilt(captioner, filter_, shapes_dir, out, cfg, progress=False)
        outs.append(list(read_records(out)))
    one, eight = outs
    assert [r["id"] for r in one] == [r["id"] for r in eight]
    for a, b in zip(one, eight):
        # sampled texts are identical; ITM scores agree to float rounding of differently batched matmuls
        assert [s["text"] for s in a["synthetic"]] == [s["text"] for s in b["synthetic"]]
        assert a["web_score"] == pytest.approx(b["web_score"], abs=1e-5)
        assert [s["score"] for s in a["synthetic"]] == pytest.approx([s["score"] for s in b["synthetic"]], abs=1e-5)
        assert a["web_keep"] == b["web_keep"] and [s["keep"] for s in a["synthetic"]] == [
            s["keep"] for s in b["synthetic"]
        ]


def test_seed_changes_samples_and_row_seed_is_stable(models, shapes_dir, tmp_path):
    captioner, filter_ = models
    texts = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{len(texts)}"
        run_capfilt(captioner, filter_, shapes_dir, out, CapfiltConfig(seed=seed, **FAST), progress=False)
        texts.append([s["text"] for r in read_records(out) for s in r["synthetic"]])
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert row_seed(0, "web-000001") == row_seed(0, "web-000001") != row_seed(1, "web-000001")


def test_rerun_resumes_and_changed_options_are_refused(models, shapes_dir, tmp_path):
    captioner, filter_ = models
    out = tmp_path / "out"
    first = run_capfilt(captioner, filter_, shapes_dir, out, CapfiltConfig(**FAST), progress=False)
    before = records_bytes(out)
    again = run_capfilt(captioner, filter_, shapes_dir, out, CapfiltConfig(**FAST), progress=False)
    assert again.resumed and again.rows_per_s == 0.0 and records_bytes(out) == before
    assert again.texts_out == first.texts_out
    with pytest.raises(JobMismatchError, match="threshold"):
        run_capfilt(captioner, filter_, shapes_dir, out, CapfiltConfig(threshold=0.9, **FAST), progress=False)
    with pytest.raises(JobMismatchError, match="filter"):
        run_capfilt(captioner, captioner_as_filter(filter_), shapes_dir, out, CapfiltConfig(**FAST), progress=False)
    redone = run_capfilt(
        captioner, filter_, shapes_dir, out, CapfiltConfig(threshold=1.01, overwrite=True, **FAST), progress=False
    )
    assert not redone.resumed and redone.texts_out == 0


def captioner_as_filter(filter_):
    """The filter with one weight changed: a different model."""
    import copy

    other = copy.deepcopy(filter_)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    return other


def test_models_without_the_needed_heads_are_refused(models, shapes_dir, tmp_path):
    captioner, filter_ = models
    with pytest.raises(ValueError, match="filter.*itm"):
        run_capfilt(captioner, captioner, shapes_dir, tmp_path / "a", CapfiltConfig(**FAST), progress=False)
    with pytest.raises(ValueError, match="captioner.*caption"):
        run_capfilt(filter_, filter_, shapes_dir, tmp_path / "b", CapfiltConfig(**FAST), progress=False)


def test_folder_of_images_gets_synthetic_captions_only(models, shapes_dir, tmp_path):
    captioner, filter_ = models
    folder = shapes_dir / "images" / "web"
    summary = run_capfilt(captioner, filter_, folder, tmp_path / "out", CapfiltConfig(threshold=0.0, **FAST), False)
    records = list(read_records(tmp_path / "out"))
    assert [r["image"] for r in records] == [f"{i:06d}.png" for i in range(24)]
    assert all(r["web_text"] is None and r["web_score"] is None and not r["web_keep"] for r in records)
    assert summary.web_texts == 0 and summary.synthetic_kept == summary.texts_out == 24
    rows = read_jsonl(tmp_path / "out" / DATASET)
    assert {r["origin"] for r in rows} == {"synthetic"} and rows[0]["image"] == str(folder / "000000.png")


def test_missing_clean_split_fails_before_the_work(models, shapes_dir, tmp_path):
    from blip.data.manifests import DataError

    captioner, filter_ = models
    cfg = CapfiltConfig(keep_clean=str(tmp_path / "nope.jsonl"), **FAST)
    with pytest.raises(DataError, match="nope.jsonl"):
        run_capfilt(captioner, filter_, shapes_dir, tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_beam_search_captions_are_the_captioners_beams(models, shapes_dir, tmp_path):
    from blip.io import read_jsonl as read_rows

    captioner, filter_ = models
    cfg = CapfiltConfig(num_beams=3, num_captions=2, **FAST)
    assert cfg.captioning().num_beams == 3 and not cfg.captioning().do_sample
    run_capfilt(captioner, filter_, shapes_dir, tmp_path / "beam", cfg, progress=False)
    records = list(read_records(tmp_path / "beam"))
    web = read_rows(shapes_dir / "web.jsonl")
    first = next(r for r in records if r["id"] == web[0]["id"])
    expected = captioner.caption(
        str(shapes_dir / web[0]["image"]),
        prompt="a picture of ",
        num_beams=3,
        num_captions=2,
        max_new_tokens=8,
        min_new_tokens=2,
        repetition_penalty=1.1,
    )
    beams = [c.text.removeprefix("a picture of ").strip() for c in expected[0]]  # one image: its two best beams
    assert [s["text"] for s in first["synthetic"]] == beams
    assert "num_beams" in cfg.describe() and "num_beams" not in CapfiltConfig().describe()  # sampled runs' ids kept


def test_an_itc_weight_adds_the_itc_cosine_to_the_itm_score(models, shapes_dir, tmp_path):
    from blip.capfilt import filter_score

    captioner, filter_ = models
    plain_cfg = CapfiltConfig(**FAST)
    run_capfilt(captioner, filter_, shapes_dir, tmp_path / "itm", plain_cfg, progress=False)
    cfg = CapfiltConfig(itc_weight=8.0, threshold=0.4, **FAST)
    run_capfilt(captioner, filter_, shapes_dir, tmp_path / "both", cfg, progress=False)
    plain, both = list(read_records(tmp_path / "itm")), list(read_records(tmp_path / "both"))
    for a, b in zip(plain, both, strict=True):
        texts = [a["web_text"]] + [s["text"] for s in a["synthetic"]]
        assert texts == [b["web_text"]] + [s["text"] for s in b["synthetic"]]  # the same captions
        image = str(shapes_dir / a["image"])
        cosine = filter_.similarity(image, texts)[0].tolist()
        itm = [a["web_score"]] + [s["score"] for s in a["synthetic"]]  # the ITM-only run's scores: P(match)
        expected = [filter_score(m, c, 8.0) for m, c in zip(itm, cosine)]
        got = [b["web_score"]] + [s["score"] for s in b["synthetic"]]
        assert got == pytest.approx(expected, abs=1e-5)
        assert b["web_keep"] == (b["web_score"] >= 0.4)
    assert any(abs(a["web_score"] - b["web_score"]) > 1e-3 for a, b in zip(plain, both))
    assert cfg.describe()["itc_weight"] == 8.0 and "itc_weight" not in plain_cfg.describe()  # ITM-only ids kept
    with pytest.raises(ValueError, match="--itc-weight must be a number >= 0, got -1"):
        CapfiltConfig(itc_weight=-1.0).validate()
