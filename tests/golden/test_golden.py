"""The tiny checkpoints stored in tests/golden give exactly the stored outputs (ids and texts; scores within 1e-4),
and those are transformers' outputs. Regenerate: `.venv/bin/python tests/golden/golden_outputs.py` (see there)."""

from __future__ import annotations

import json

import golden_outputs as golden
import pytest


def test_blip_gives_the_stored_outputs():
    expected = json.loads(golden.EXPECTED.read_text())
    problems = golden.differences(golden.blip_outputs(), expected)
    assert not problems, "\n".join(problems[:20])


def test_the_stored_outputs_are_what_transformers_gives():
    pytest.importorskip("transformers")
    expected = json.loads(golden.EXPECTED.read_text())
    problems = golden.differences(golden.hf_outputs(), expected)
    assert not problems, "\n".join(problems[:20])


def test_the_stored_files_stay_small_and_cover_every_task():
    total = sum(p.stat().st_size for p in golden.HERE.rglob("*") if p.is_file())
    assert total < 600_000
    expected = json.loads(golden.EXPECTED.read_text())
    assert len(expected["caption"]) == len(golden.CAPTION_SETTINGS) and len(expected["vqa"]) == 2
    lengths = {len(c["token_ids"]) for row in expected["caption"] for c in row}
    assert len(lengths) > 2, "captions should end at different lengths"
    assert len(expected["itm"]) == golden.N_IMAGES and len(expected["itc"][0]) == len(golden.TEXTS)
