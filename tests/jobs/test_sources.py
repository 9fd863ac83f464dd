"""Inputs: folders, CSV/JSONL manifests and WebDataset shards become the same fixed list of rows."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from jobs_helpers import make_folder

from blip.data.webdataset import expand_braces
from blip.jobs.sources import (
    InputError,
    InputOptions,
    Row,
    RowError,
    plan_input,
    read_image,
    shard_paths,
)


def test_expand_braces():
    assert expand_braces("web-{000000..000002}.tar") == ["web-000000.tar", "web-000001.tar", "web-000002.tar"]
    assert expand_braces("a{1..3}") == ["a1", "a2", "a3"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("x{9..11}") == ["x9", "x10", "x11"]


def test_folder_plan_is_sorted_recursive_and_filtered(tmp_path):
    good, bad = make_folder(tmp_path)
    plan = plan_input(str(tmp_path), "caption")
    assert [r.id for r in plan.rows] == sorted([*good, *bad])
    assert plan.skipped_files == 1  # notes.txt
    assert all(r.source == str(tmp_path / r.id) for r in plan.rows)
    every = plan_input(str(tmp_path), "caption", InputOptions(extensions=("*",)))
    assert "notes.txt" in [r.id for r in every.rows]
    excluded = plan_input(str(tmp_path), "caption", InputOptions(exclude=(str(tmp_path / "bad"),)))
    assert [r.id for r in excluded.rows] == good
    assert plan.fingerprint() == plan_input(str(tmp_path), "caption").fingerprint()
    assert plan.fingerprint() != excluded.fingerprint()


def test_jsonl_manifest_rows_and_problems(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    lines = [
        {"id": 7, "image": "a.png", "text": "a text", "question": "why?"},
        {"image": "https://example.com/x.jpg"},
        {"image": ""},
        "[1, 2]",
        "{broken",
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    rows = plan_input(str(path), "caption").rows
    assert rows[0] == Row("7", str(tmp_path / "a.png"), "a text", "why?")
    assert rows[1].id == "https://example.com/x.jpg" and rows[1].source == "https://example.com/x.jpg"
    assert rows[2].problem == "no image path" and rows[2].id == "line 3"
    assert "expected a JSON object" in rows[3].problem
    assert "not valid JSON" in rows[4].problem and rows[4].id == "line 5"


def test_csv_manifest_columns_and_task_expansion(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("file,caption,q\nx.png,a cat,\ny.png,,what?\n")
    rows = plan_input(str(path), "match").rows
    assert [(r.id, r.text, r.problem) for r in rows] == [("x.png", "a cat", None), ("y.png", None, "no text")]
    rows = plan_input(str(path), "vqa", InputOptions(question_column="q")).rows
    assert [(r.question, r.problem) for r in rows] == [(None, "no question"), ("what?", None)]
    rows = plan_input(str(path), "vqa", InputOptions(questions=("q1", "q2"))).rows
    assert [(r.id, r.question) for r in rows] == [("x.png", "q1"), ("x.png", "q2"), ("y.png", "q1"), ("y.png", "q2")]
    with pytest.raises(InputError, match="no image column"):
        plan_input(str(path), "caption", InputOptions(image_column="nope"))
    assert plan_input(str(path), "caption", InputOptions(limit=1)).rows == rows[:0] + [
        Row("x.png", str(tmp_path / "x.png"), "a cat")
    ]


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_plan_and_read(tmp_path):
    from oracle import make_images, png_bytes

    png = png_bytes(make_images(1)[0])
    _tar(tmp_path / "s-0.tar", [("a.png", png), ("a.txt", b"first"), ("b.json", b"{}"), ("c.jpg", b"junk")])
    _tar(tmp_path / "s-1.tar", [("d.png", png)])
    (tmp_path / "s-2.tar").write_bytes(b"not a tar at all" * 100)
    plan = plan_input(str(tmp_path / "s-{0..2}.tar"), "caption")
    ids = [r.id for r in plan.rows]
    assert ids == ["s-0.tar/a", "s-0.tar/b", "s-0.tar/c", "s-1.tar/d", "s-2.tar"]
    rows = {r.id: r for r in plan.rows}
    assert rows["s-0.tar/a"].text == "first"
    assert "no image member" in rows["s-0.tar/b"].problem
    assert rows["s-2.tar"].problem and "unreadable tar" in rows["s-2.tar"].problem
    assert read_image(rows["s-1.tar/d"]).size == make_images(1)[0].size
    assert read_image(rows["s-0.tar/a"], 16).size == (16, 16)
    with pytest.raises(RowError, match="not an image"):
        read_image(rows["s-0.tar/c"])
    assert [p.name for p in shard_paths(str(tmp_path / "s-*.tar"))] == ["s-0.tar", "s-1.tar", "s-2.tar"]


def test_read_image_errors(tmp_path):
    with pytest.raises(RowError, match="No such file"):
        read_image(Row("x", str(tmp_path / "missing.png")))
    with pytest.raises(RowError, match="no image path"):
        read_image(Row("x", "", problem="no image path"))
    with pytest.raises(RowError, match="cannot fetch"):
        read_image(Row("x", "http://127.0.0.1:9/none.png"))


def test_duplicate_member_names_in_a_shard_are_row_errors(tmp_path):
    """Issue 14.12: a repeated member name used to keep one copy silently (the earlier sample was lost)."""
    from oracle import make_images, png_bytes

    pngs = [png_bytes(image) for image in make_images(2)]
    members = [("a.png", pngs[0]), ("a.txt", b"first"), ("a.png", pngs[1]), ("a.txt", b"second")]  # adjacent copies
    members += [("b.png", pngs[0]), ("c.png", pngs[1]), ("b.png", pngs[1])]  # b comes back later in the shard
    _tar(tmp_path / "d.tar", members)
    rows = plan_input(str(tmp_path / "d.tar"), "caption").rows
    assert [r.id for r in rows] == ["d.tar/a", "d.tar/b", "d.tar/c", "d.tar/b"]
    assert (
        rows[0].problem
        == "duplicate member name in d.tar: a.png, a.txt (a sample's members must be unique in its shard)"
    )
    assert rows[1].problem is None and rows[2].problem is None
    assert "duplicate member name in d.tar: b.png" in rows[3].problem
    with pytest.raises(RowError, match="duplicate member name"):
        read_image(rows[0])
    assert read_image(rows[1]).tobytes() == make_images(2)[0].convert("RGB").tobytes()  # the first b, as it came


def test_a_pair_row_with_a_problem_keeps_the_image_it_names(tmp_path):
    # its error row says which pair it was: image_a as given, though image_b is missing
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image_a,image_b,statement\na.png,,a circle\n,b.png,a star\n")
    first, second = plan_input(str(manifest), "reason").rows
    assert (first.problem, first.source, first.source_b) == ("no image_b", str(tmp_path / "a.png"), None)
    assert (second.problem, second.source, second.source_b) == ("no image_a", "", str(tmp_path / "b.png"))
