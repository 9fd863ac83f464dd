"""The shapes world: determinism, truthful captions, controlled noise, correct answers, valid files, the CLI."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip.data import shapes as S
from blip.evaluation import vqa_question_accuracy

# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary and scenes


def test_vocabulary_is_small_and_closed():
    vocab = set(S.vocabulary())
    assert 60 <= len(vocab) <= 100
    assert all(w == w.lower() for w in vocab)
    texts = []
    for i in range(200):
        for split in S.SPLITS:
            ex = S.make_example(split, i)
            for rows in ex.rows.values():
                for r in rows:
                    texts += r.get("captions", []) + [r.get("caption", ""), r.get("question", "")]
                    texts += [r.get("answer", "")] + r.get("answers", [])
    used = {w for t in texts for w in S.tokenize(t)}
    assert used <= vocab, used - vocab
    assert len(used) > 0.9 * len(vocab)  # the vocabulary lists no dead words
    assert set(S.ANSWER_LIST) <= vocab


def test_scenes_are_well_formed_and_shapes_never_collide():
    cfg = S.ShapesConfig()
    rng = random.Random(0)
    n_shapes = Counter()
    for _ in range(500):
        scene = S.sample_scene(rng, cfg)
        n = len(scene.shapes)
        n_shapes[n] += 1
        assert cfg.min_shapes <= n <= cfg.max_shapes
        for attr in ("kind", "color", "position"):
            assert len({getattr(s, attr) for s in scene.shapes}) == n
        assert scene.background in S.BACKGROUNDS
        for a in scene.shapes:
            (ax, ay), ra = a.center(), S.SIZES[a.size]
            assert ra <= ax <= 1 - ra and ra <= ay <= 1 - ra  # inside the image
            for b in scene.shapes:
                if a is not b:
                    (bx, by), rb = b.center(), S.SIZES[b.size]
                    assert max(abs(ax - bx), abs(ay - by)) > ra + rb  # bounding boxes apart
        assert S.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert set(n_shapes) == {1, 2, 3}


def test_config_is_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        S.ShapesConfig(noise_rates=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="max_shapes"):
        S.ShapesConfig(max_shapes=6)
    with pytest.raises(ValueError, match="image_size"):
        S.ShapesConfig(image_size=8)


# ----------------------------------------------------------------------------------------------------------------------
# Pixels


def _nearest_palette_color(rgb: np.ndarray) -> str:
    palette = {**S.SHAPE_COLORS, **S.BACKGROUNDS}
    return min(palette, key=lambda name: float(np.sum((np.array(palette[name]) - rgb) ** 2)))


@pytest.mark.parametrize(
    "cfg",
    [S.ShapesConfig(), S.ShapesConfig(image_size=96, texture=False, antialias=False)],
    ids=["default", "96px-plain"],
)
def test_rendered_shapes_have_their_colour_at_their_position(cfg):
    rng = random.Random(1)
    n = cfg.image_size
    yy, xx = np.mgrid[0:n, 0:n] + 0.5  # pixel centres
    for _ in range(150):
        scene = S.sample_scene(rng, cfg)
        pixels = np.asarray(S.render(scene, cfg), dtype=np.float64)
        assert pixels.shape == (n, n, 3)
        for s in scene.shapes:
            x, y = s.center()
            inner = (xx - x * n) ** 2 + (yy - y * n) ** 2 <= (0.3 * S.SIZES[s.size] * n) ** 2
            inner[int(y * n), int(x * n)] = True
            mean = pixels[inner].mean(axis=0)
            assert _nearest_palette_color(mean) == s.color, (scene, s, mean)
            assert np.abs(mean - S.SHAPE_COLORS[s.color]).max() < 40
        corner = pixels[:3, :3].reshape(-1, 3).mean(axis=0)  # no slot reaches the corners
        assert _nearest_palette_color(corner) == scene.background


def test_render_is_a_pure_function_of_the_scene():
    scene = S.scene_for("web", 7)
    a, b = S.render(scene), S.render(scene)
    assert a.tobytes() == b.tobytes()
    other = S.Scene(scene.background, scene.shapes, scene.texture_seed + 1)
    assert S.render(other).tobytes() != a.tobytes()  # texture noise follows the scene's seed


# ----------------------------------------------------------------------------------------------------------------------
# Captions


def test_parse_caption_and_errors():
    scene = S.Scene(
        "white",
        (S.Shape("circle", "red", "small", "left"), S.Shape("square", "blue", "large", "center")),
    )
    p = S.parse_caption("two shapes: a small red circle on the left of a big blue square on a white background")
    assert p.mentions == (S.Mention("red", "circle", "small", None), S.Mention("blue", "square", "large", None))
    assert p.relations == ((0, "left of", 1),) and p.background == "white" and p.count == 2
    assert S.check_caption(scene, "a red circle on the left and a blue square in the middle")
    assert S.check_caption(scene, "a blue square to the right of a red circle")
    assert S.caption_errors(scene, "a blue square to the left of a red circle") == [
        "the blue square is not left of the red circle"
    ]
    assert S.caption_errors(scene, "a large red circle at the top") == [
        "the red circle is small, not large",
        "the red circle is at left, not top",
    ]
    assert S.caption_errors(scene, "three shapes: a red circle, a blue square on a black background") == [
        "the background is white, not black",
        "there are 2 shapes, not 3",
    ]
    assert S.caption_errors(scene, "buy now best price 2019") == ["no shape mentioned"]
    assert S.caption_errors(scene, "a green circle") == ["no green circle"]


def _mentioned_pairs(text: str) -> set[tuple[str, str]]:
    return {(m.color, m.kind) for m in S.parse_caption(text).mentions}


def _scene_pairs(scene: S.Scene) -> set[tuple[str, str]]:
    return {(s.color, s.kind) for s in scene.shapes}


def test_references_are_true_complete_paraphrases():
    templates_seen = set()
    for i in range(300):
        ex = S.make_example("clean" if i % 2 else "test", i)
        caps = ex.rows[ex.split][0]["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5
        for c in caps:
            assert c == c.lower() and len(S.tokenize(c)) <= 30
            assert S.caption_errors(ex.scene, c) == [], c
            assert _mentioned_pairs(c) == _scene_pairs(ex.scene), c
            templates_seen.add(S.tokenize(c)[0:2][-1])
    assert len(templates_seen) >= 5  # paraphrases start in several ways


def test_web_noise_rates_and_labels():
    n = 2000
    rows = [S.make_example("web", i, seed=3).rows["web"][0] for i in range(n)]
    counts = Counter(r["noise"] for r in rows)
    for kind, rate in zip(S.NOISE_KINDS, S.ShapesConfig().noise_rates):
        assert abs(counts[kind] / n - rate) < 0.035, counts
    details = Counter(r["noise_detail"] for r in rows if r["noise"] == "partial")
    assert set(details) == set(S.PARTIAL_ATTRIBUTES) and min(details.values()) > 0.2 * counts["partial"]

    for r in rows:
        scene, caption = S.Scene.from_dict(r["scene"]), r["caption"]
        mentions = S.parse_caption(caption).mentions
        if r["noise"] == "correct":
            assert S.check_caption(scene, caption) and _mentioned_pairs(caption) == _scene_pairs(scene), r
        elif r["noise"] == "partial":
            assert len(S.caption_errors(scene, caption)) == 1, r
            by_kind = {s.kind: s for s in scene.shapes}
            by_color = {s.color: s for s in scene.shapes}
            wrong = [m for m in mentions if (m.color, m.kind) not in _scene_pairs(scene)]
            if r["noise_detail"] == "color":  # one mention: right kind, colour nobody has
                assert len(wrong) == 1 and wrong[0].kind in by_kind and wrong[0].color not in by_color, r
            elif r["noise_detail"] == "shape":  # one mention: right colour, kind nobody has
                assert len(wrong) == 1 and wrong[0].color in by_color and wrong[0].kind not in by_kind, r
            else:  # every shape named right, exactly one placed wrong
                assert not wrong and all(m.position for m in mentions), r
                assert sum(m.position != by_kind[m.kind].position for m in mentions) == 1, r
        elif r["noise"] == "unrelated":
            split, index = r["source"].split("-")
            assert split == "web" and int(index) != int(r["id"].split("-")[1])
            source = S.scene_for("web", int(index), seed=3)
            assert S.check_caption(source, caption) and not S.check_caption(scene, caption), r
        else:
            assert r["noise"] == "junk" and not mentions, r


def test_corrupt_api():
    scene = S.scene_for("clean", 0)
    rng = random.Random(0)
    with pytest.raises(ValueError, match="other"):
        S.corrupt(scene, "unrelated", rng)
    with pytest.raises(ValueError, match="noise kind"):
        S.corrupt(scene, "typo", rng)
    for attribute in S.PARTIAL_ATTRIBUTES:
        assert len(S.caption_errors(scene, S.corrupt(scene, "partial", rng, attribute=attribute))) == 1
    full = S.Scene("white", tuple(S.Shape(k, c, "small", p) for k, c, p in zip(S.KINDS, S.SHAPE_COLORS, S.POSITIONS)))
    with pytest.raises(ValueError, match="no free shape"):
        S.swap_attribute(full, "shape", rng)


def test_hard_negatives_change_one_phrase_and_are_false():
    categories = Counter()
    for index in range(60):
        example = S.make_example("clean", index)
        for caption in example.rows["clean"][0]["captions"]:
            negatives = S.hard_negatives(example.scene, caption, random.Random(index), n=3)
            assert 1 <= len(negatives) <= 3 and len(set(negatives)) == len(negatives)
            for text in negatives:
                assert not S.check_caption(example.scene, text), (caption, text)
                before, after = caption.split(), text.split()
                while before and after and before[0] == after[0]:
                    before, after = before[1:], after[1:]
                while before and after and before[-1] == after[-1]:
                    before, after = before[:-1], after[:-1]
                assert 1 <= max(len(before), len(after)) <= 5, (caption, text)  # one phrase (and its article)
                for category, phrases in S.NEGATIVE_SWAPS.items():
                    if any(p in text and p not in caption for p in phrases):
                        categories[category] += 1
            assert "an red" not in " ".join(negatives) and "a orange" not in " ".join(negatives)
    assert set(categories) >= {"color", "shape", "position", "count", "background", "relation", "size"}


def test_hard_negatives_of_chosen_categories_change_only_those():
    checked = 0
    for index in range(10):
        example = S.make_example("clean", index)
        for caption in example.rows["clean"][0]["captions"]:
            for text in S.hard_negatives(example.scene, caption, random.Random(0), n=5, categories=("position",)):
                errors = S.caption_errors(example.scene, text)
                assert len(errors) == 1 and " is at " in errors[0], (caption, text)  # the one error: a place
                checked += 1
    assert checked >= 10
    with pytest.raises(ValueError, match="unknown negative categories"):
        S.hard_negatives(example.scene, "a red circle", random.Random(0), categories=("colour",))


# ----------------------------------------------------------------------------------------------------------------------
# Questions


def _answer_from_scene(question: str, scene: S.Scene) -> str:
    """An independent reading of each question form."""
    w = S.tokenize(question)
    if w[:3] == ["what", "color", "is"]:
        return scene.background if w[-1] == "background" else scene.find(kind=w[-1]).color
    if w[:2] == ["what", "shape"]:
        return scene.find(color=w[-1]).kind
    if w[:2] == ["what", "size"]:
        return scene.find(kind=w[-1]).size
    if w[0] == "where":
        return scene.find(kind=w[-1]).position
    if w[:2] == ["how", "many"]:
        return str(len(scene.shapes))
    if w[:2] == ["is", "there"]:
        color = w[-2] if w[-2] in S.SHAPE_COLORS else None
        return "yes" if scene.find(kind=w[-1], color=color) else "no"
    raise AssertionError(f"unknown question form: {question}")


def test_vqa_answers_are_correct_and_humans_mostly_agree():
    types, answers = Counter(), Counter()
    for i in range(400):
        ex = S.make_example("vqa" if i % 2 else "test", i)
        rows = ex.rows["vqa" if i % 2 else "vqa_test"]
        assert len(rows) == 5 and len({r["question"] for r in rows}) == 5
        for r in rows:
            assert r["question"].endswith("?")
            assert r["answer"] == _answer_from_scene(r["question"], ex.scene), r
            assert r["answer"] in S.ANSWER_LIST
            assert len(r["answers"]) == 10 and r["answers"].count(r["answer"]) >= 6
            assert Counter(r["answers"]).most_common(1)[0][0] == r["answer"]
            assert vqa_question_accuracy(r["answer"], r["answers"], normalize=False) == 1.0
            assert r["answer_type"] == {"yes": "yes/no", "no": "yes/no"}.get(
                r["answer"], "number" if r["answer"].isdigit() else "other"
            )
            types[r["question_type"]] += 1
            answers[r["answer"]] += 1
    assert len(types) == 7 and answers["yes"] and answers["no"]
    assert abs(answers["yes"] - answers["no"]) < 0.3 * (answers["yes"] + answers["no"])


def test_vqa_accuracy_follows_the_official_formula():
    assert vqa_question_accuracy("red", ["red"] * 10, normalize=False) == 1.0
    assert vqa_question_accuracy("red", ["red"] * 3 + ["blue"] * 7, normalize=False) == pytest.approx(
        0.9
    )  # 3 of 10: 7 x 1 + 3 x 2/3
    assert vqa_question_accuracy("red", ["blue"] * 10, normalize=False) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Rows and files

SMALL = dict(n_clean=12, n_web=13, n_vqa=7, n_test=9, webdataset=True, shard_size=5, progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_example_is_a_pure_function_of_seed_split_index():
    for split in S.SPLITS:
        assert S.make_example(split, 5, seed=1) == S.make_example(split, 5, seed=1)
        assert S.make_example(split, 5, seed=1).rows != S.make_example(split, 5, seed=2).rows
        assert S.make_example(split, 5, seed=1).scene != S.make_example(split, 6, seed=1).scene


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "a"
    S.generate(out, seed=0, **SMALL)
    return out


def test_generate_is_deterministic_across_runs_and_workers(dataset, tmp_path):
    S.generate(tmp_path / "b", seed=0, workers=2, **SMALL)
    a, b = _tree(dataset), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    S.generate(tmp_path / "c", seed=1, **SMALL)
    c = _tree(tmp_path / "c")
    assert c.keys() == a.keys()
    assert a["images/web/000000.png"] != c["images/web/000000.png"] and a["web.jsonl"] != c["web.jsonl"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_and_images_regenerate_alone(dataset):
    cfg = S.ShapesConfig()
    manifests = {name: _jsonl(dataset / f"{name}.jsonl") for name in ("clean", "web", "vqa", "test", "vqa_test")}
    for split, n in (("clean", 12), ("web", 13), ("vqa", 7), ("test", 9)):
        for i in (0, n - 1):
            ex = S.make_example(split, i, seed=0, cfg=cfg)
            for name, rows in ex.rows.items():
                written = [r for r in manifests[name] if r["image"] == ex.image]
                assert written == json.loads(json.dumps(rows))
            on_disk = np.asarray(Image.open(dataset / ex.image))
            assert np.array_equal(on_disk, np.asarray(S.render(ex.scene, cfg)))


def test_files_are_in_the_documented_formats(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["complete"] and meta["seed"] == 0 and meta["args"]["n_web"] == 13
    assert meta["counts"]["images"] == {"clean": 12, "web": 13, "vqa": 7, "test": 9}
    assert sum(meta["counts"]["web_noise"].values()) == 13 and meta["vocab_size"] == len(S.vocabulary())
    assert meta["noise_rates"] == dict(zip(S.NOISE_KINDS, S.ShapesConfig().noise_rates))

    for name, n in (("clean", 12), ("web", 13), ("vqa", 35), ("test", 9), ("vqa_test", 45)):
        rows = _jsonl(dataset / f"{name}.jsonl")
        assert len(rows) == n
        for r in rows:
            with Image.open(dataset / r["image"]) as im:
                assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    clean = _jsonl(dataset / "clean.jsonl")
    assert clean[12 - 1]["image"] == "images/clean/000011.png" and clean[0]["id"] == "clean-000000"
    assert set(clean[0]) == {"id", "image", "captions", "scene"}
    assert set(_jsonl(dataset / "web.jsonl")[0]) == {
        "id",
        "image",
        "caption",
        "noise",
        "noise_detail",
        "source",
        "scene",
    }
    vqa = _jsonl(dataset / "vqa.jsonl")
    assert {"image", "question", "answer", "answers", "answer_type"} <= set(vqa[0])
    assert json.loads((dataset / "answer_list.json").read_text()) == list(S.ANSWER_LIST)

    karpathy = json.loads((dataset / "dataset_shapes.json").read_text())
    assert Counter(im["split"] for im in karpathy["images"]) == {"train": 12, "test": 9}
    for im in karpathy["images"]:
        assert (dataset / im["filepath"] / im["filename"]).is_file()
        assert len(im["sentences"]) == 5 and all(s["raw"] and s["tokens"] for s in im["sentences"])
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]

    coco = json.loads((dataset / "captions_test_coco.json").read_text())
    assert len(coco["images"]) == 9 and len(coco["annotations"]) == 45
    assert len({a["id"] for a in coco["annotations"]}) == 45
    assert {a["image_id"] for a in coco["annotations"]} == {im["id"] for im in coco["images"]}

    qs = json.loads((dataset / "vqa_test_questions.json").read_text())["questions"]
    anns = json.loads((dataset / "vqa_test_annotations.json").read_text())["annotations"]
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns] and len(qs) == 45
    assert len({q["question_id"] for q in qs}) == 45
    for a in anns:
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert a["answer_type"] in ("yes/no", "number", "other") and a["multiple_choice_answer"] in S.ANSWER_LIST


def test_webdataset_shards_group_members_by_key(dataset):
    shards = sorted(dataset.glob("web-*.tar"))
    assert [p.name for p in shards] == ["web-000000.tar", "web-000001.tar", "web-000002.tar"]
    web = {r["id"]: r for r in _jsonl(dataset / "web.jsonl")}
    keys_seen = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            groups = defaultdict(dict)
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                groups[key][ext] = tar.extractfile(m).read()
        keys_seen += list(groups)
        assert len(groups) <= 5
        for key, files in groups.items():
            assert set(files) == {"png", "txt", "json"}
            row = json.loads(files["json"])
            assert row == web[f"web-{key}"] and files["txt"].decode() == row["caption"]
            assert files["png"] == (dataset / row["image"]).read_bytes()
    assert keys_seen == [f"{i:06d}" for i in range(13)]


def test_rerun_resumes_and_other_arguments_are_refused(tmp_path):
    out = tmp_path / "d"
    args = dict(n_clean=3, n_web=4, n_vqa=2, n_test=2, progress=False)
    S.generate(out, **args)
    before = _tree(out)
    (out / "images/web/000002.png").unlink()  # as if killed mid-run
    kept = out / "images/web/000001.png"
    kept.write_bytes(b"sentinel")  # finished images are not redone
    S.generate(out, **args)
    after = _tree(out)
    assert after["images/web/000002.png"] == before["images/web/000002.png"]
    assert kept.read_bytes() == b"sentinel"
    kept.write_bytes(before["images/web/000001.png"])
    assert _tree(out) == before

    with pytest.raises(FileExistsError, match="different arguments.*n_web.*overwrite"):
        S.generate(out, **{**args, "n_web": 5})
    with pytest.raises(FileExistsError, match="seed"):
        S.generate(out, **args, seed=9)
    S.generate(out, **{**args, "n_web": 5}, overwrite=True)
    assert len(_jsonl(out / "web.jsonl")) == 5 and len(list((out / "images/web").iterdir())) == 5

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no meta.json"):
        S.generate(other, **args)


def test_cli_main_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--seed", "4", "--n-web", "6", "--n-clean", "3", "--n-vqa", "2", "--n-test", "2"]
    argv += ["--image-size", "48", "--webdataset", "--shard-size", "4", "--workers", "2", "--quiet"]
    assert S.cli_main(argv) == 0
    assert "wrote 13 images" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 4 and meta["args"]["cfg"]["image_size"] == 48 and meta["counts"]["webdataset_shards"] == 2
    with Image.open(out / "images/test/000001.png") as im:
        assert im.size == (48, 48)
    assert S.cli_main(argv) == 0  # same arguments: resumes
    assert S.cli_main([*argv, "--seed", "5"]) == 2
    assert "different arguments" in capsys.readouterr().err
    assert S.cli_main([*argv, "--seed", "5", "--overwrite", "--noise-rates", "0,0,0,1"]) == 0
    assert {r["noise"] for r in _jsonl(out / "web.jsonl")} == {"junk"}
    with pytest.raises(SystemExit) as e:
        S.cli_main(["--out", str(out), "--noise-rates", "0.5,0.5"])
    assert e.value.code == 2


def test_labelled_scenes_name_the_shape_under_each_patch():
    from blip.data.shapes import (
        KINDS,
        PATCH_LABELS,
        POSITIONS,
        SHAPE_COLORS,
        Scene,
        Shape,
        ShapesConfig,
        labelled_scenes,
        patch_labels,
    )

    assert list(PATCH_LABELS) == ["kind", "color", "position"] and {v[0] for v in PATCH_LABELS.values()} == {"none"}
    cfg = ShapesConfig(image_size=48, max_shapes=2)
    images, labels = labelled_scenes(40, grid=3, seed=3, cfg=cfg)
    again, same = labelled_scenes(40, grid=3, seed=3, cfg=cfg)
    assert same == labels and all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    assert {im.size for im in images} == {(48, 48)} and {len(lab) for lab in labels} == {9}
    assert labelled_scenes(40, grid=3, seed=3, part="test", cfg=cfg)[1] != labels
    # one large red circle in the centre: the centre patch names it, the corners nothing
    circle = Scene("white", (Shape("circle", "red", "large", "center"),))
    named = (1 + KINDS.index("circle"), 1 + list(SHAPE_COLORS).index("red"), 1 + list(POSITIONS).index("center"))
    grid3 = patch_labels(circle, 3)
    assert grid3[4] == named and grid3[0] == grid3[2] == grid3[6] == grid3[8] == (0, 0, 0)
    # two shapes: each patch names its own one, with that one's place
    pair = Scene("gray", (Shape("star", "blue", "large", "left"), Shape("square", "pink", "small", "right")))
    row = patch_labels(pair, 6)[3 * 6 : 4 * 6]  # the middle row (centres at y = 0.5 sit on rows 2 and 3)
    assert row[0][2] == row[1][2] == 1 + list(POSITIONS).index("left") and row[0][0] == 1 + KINDS.index("star")
    assert row[5][2] == 1 + list(POSITIONS).index("right") and row[5][1] == 1 + list(SHAPE_COLORS).index("pink")
    assert row[2] == row[3] == (0, 0, 0)
    with pytest.raises(ValueError, match="grid"):
        patch_labels(pair, 0)
    # on the drawn images: a named patch is covered by pixels of the named colour, an unnamed one mostly background
    names = list(SHAPE_COLORS)
    for image, scene_labels in zip(images, labels):
        pixels = np.asarray(image, dtype=np.float32).reshape(3, 16, 3, 16, 3).transpose(0, 2, 1, 3, 4)
        for (r, c), (kind, color, _) in zip(np.ndindex(3, 3), scene_labels):
            patch = pixels[r, c].reshape(-1, 3)
            near = {n: np.abs(patch - SHAPE_COLORS[n]).sum(1) < 60 for n in names}
            if kind:
                assert near[names[color - 1]].mean() >= 0.05
            else:
                assert max(share.mean() for share in near.values()) <= 0.2
