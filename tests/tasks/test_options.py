"""One option, four faces: every task option has one definition (`blip.tasks.options`), and the Python API, the
command lines (`blip caption|vqa`, `blip batch caption|vqa`), the server's schemas and the batch-job options show it
with the same name and default, and refuse a bad value with the same message."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import blip  # noqa: E402
from blip.cli import build_parser, main  # noqa: E402
from blip.jobs import BatchConfig, TaskOptions  # noqa: E402
from blip.jobs.cli import batch_main, build_batch_parser  # noqa: E402
from blip.models.generation import GenerationConfig  # noqa: E402
from blip.serve import ServeSettings, create_app  # noqa: E402
from blip.tasks.options import (  # noqa: E402
    OPTIONS,
    CaptionOptions,
    OptionError,
    VqaOptions,
    add_option_flags,
    flag,
    takes_options,
)
from oracle import make_images, png_bytes  # noqa: E402

SRC = Path(blip.__file__).parent
API = {"caption": blip.Blip.caption, "vqa": blip.Blip.answer}
API_OWN = {"caption": ["self", "images"], "vqa": ["self", "images", "questions"]}
ROUTES = {"caption": ("CaptionRequest", "CaptionForm"), "vqa": ("VqaRequest", "VqaForm")}
GENERATING = ("caption", "vqa")


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(loader=dict).openapi()["components"]["schemas"]


@pytest.fixture(scope="module")
def png() -> bytes:
    return png_bytes(make_images(1, seed=4)[0])


@pytest.fixture(scope="module")
def client(captioner, answerer):
    """The server over the tiny models, its caps as loose as the options' own ranges (so the options decide)."""
    settings = ServeSettings(max_new_tokens=1024, max_beams=16, max_captions=16, max_wait_ms=1.0)
    with TestClient(create_app({"captioner": captioner, "vqa": answerer}, settings)) as c:
        yield c


# --- the same names and defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("task", GENERATING)
def test_every_option_has_one_name_and_default_on_every_face(task, openapi):
    cls = OPTIONS[task]
    defaults = cls.defaults()
    assert defaults, task

    # the Python API: the method's own parameters, then every option with its default, in order
    params = inspect.signature(API[task]).parameters
    assert list(params) == API_OWN[task] + list(defaults)
    assert {n: params[n].default for n in defaults} == defaults

    # the command lines: a flag per option, with its default
    for parser in (subparser(build_parser(), task), subparser(build_batch_parser(), task)):
        actions = flags_of(parser)
        for name, default in defaults.items():
            assert flag(name) in actions[name].option_strings, (parser.prog, name)
            assert actions[name].default == default, (parser.prog, name)

    # the server: the JSON body and the upload form have the option as a field, default and range included
    for schema_name in ROUTES[task]:
        properties = openapi[schema_name]["properties"]
        for name, spec in cls.specs().items():
            field = properties[name]
            assert field.get("default") == defaults[name], name
            choices = field.get("anyOf", [field])[0]
            if spec.minimum is not None:
                key = "exclusiveMinimum" if spec.exclusive_minimum else "minimum"
                assert choices[key] == spec.minimum, (schema_name, name)
            if spec.maximum is not None:
                assert choices["maximum"] == spec.maximum, (schema_name, name)

    # the batch jobs: TaskOptions has every option; left unset, each takes the task's default
    assert set(defaults) <= {f.name for f in dataclasses.fields(TaskOptions)}
    assert TaskOptions().for_task(task) == cls()


def test_the_old_flags_and_names_still_work():
    args = subparser(build_parser(), "caption").parse_args(["x.png", "--model", "m", "--sample", "--top-p", "0.5"])
    assert args.do_sample is True and args.top_p == "0.5"
    args = subparser(build_batch_parser(), "caption").parse_args(["-m", "m", "-i", "i", "-o", "o", "--do-sample"])
    assert args.do_sample is True
    assert "num_captions" in inspect.signature(blip.Blip.caption).parameters  # the API name, not the decoder's


# Names of options that also name something else, where a default of their own is right.
HOMONYMS = {
    "api.py:create_model(seed)",  # the random initialisation's seed
    "cli.py:--seed",  # `blip demo --seed`: the shapes world's, the models' and CapFilt's seed
    "jobs/cli.py:--top-k",  # `blip retrieve --top-k`: results per query
    "jobs/index.py:kmeans(seed)",  # k-means initialisation
    "tasks/retrieval.py:search_texts(top_k)",  # results per query
    "tasks/retrieval.py:search_images(top_k)",
    "serve/schemas.py:RetrieveRequest.top_k",  # /v1/retrieve: results per query
    "api.py:__init__(prompt_template)",  # a BLIP-2 checkpoint's own template (the option's None means "use it")
    # the Hugging Face and OpenAI APIs' own parameters, None when not given (then the option's default applies)
    "serve/schemas.py:HfCaptionParameters.max_new_tokens",
    "serve/schemas.py:HfVqaParameters.top_k",  # answers wanted
    "serve/schemas.py:ChatRequest.temperature",  # OpenAI's: 0 to 2, above 0 samples
    "serve/schemas.py:ChatRequest.top_p",
    "serve/schemas.py:ChatRequest.seed",
}


def _defaults_defined(path: Path, names: set[str]) -> list[str]:
    """Where `path` gives one of `names` a default: a parameter, a class field, a flag, or a keyword constant."""
    where = path.relative_to(SRC).as_posix()
    flags = {flag(name): name for name in names}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.posonlyargs + node.args.args
            positional = list(zip(args[len(args) - len(node.args.defaults) :], node.args.defaults))
            for arg, default in positional + list(zip(node.args.kwonlyargs, node.args.kw_defaults)):
                if default is not None and arg.arg in names:
                    found.append(f"{where}:{node.name}({arg.arg})")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    if item.target.id in names:
                        found.append(f"{where}:{node.name}.{item.target.id}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            found += [f"{where}:{a.value}" for a in node.args if isinstance(a, ast.Constant) and a.value in flags]
        elif isinstance(node, ast.keyword) and node.arg in names and isinstance(node.value, ast.Constant):
            found.append(f"{where}:{node.arg}={node.value.value!r}")
    return found


def test_generation_defaults_are_defined_in_one_place():
    """`GenerationConfig` (models/) has no defaults of its own, and no module of the four faces (API, command lines,
    server, batch jobs) nor of models/ and tasks/ gives an option a default: `blip.tasks.options` is the one place."""
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(GenerationConfig))
    names = {name for cls in OPTIONS.values() for name in cls.specs()}
    modules = [SRC / "api.py", SRC / "cli.py"]
    for package in ("jobs", "models", "tasks", "serve"):
        modules += sorted((SRC / package).rglob("*.py"))
    # the server's own caps (ServeSettings.max_new_tokens, `blip serve --max-new-tokens`) are limits, not defaults
    skip = {SRC / "tasks" / "options.py", SRC / "serve" / "settings.py", SRC / "serve" / "cli.py"}
    found = [f for path in modules if path not in skip for f in _defaults_defined(path, names)]
    assert sorted(set(found) - HOMONYMS) == [], found


def test_a_new_option_is_added_in_one_place_and_appears_on_every_face():
    from blip.serve.schemas import _Strict, option_model
    from blip.tasks.options import option

    @dataclasses.dataclass(frozen=True)
    class More(CaptionOptions):
        no_repeat: int = option(0, "no n-gram of this size twice", "int", minimum=0, maximum=8)

    @takes_options(More)
    def caption(images, *, options):
        return options

    assert inspect.signature(caption).parameters["no_repeat"].default == 0
    assert caption("x.png", no_repeat=3).no_repeat == 3
    parser = argparse.ArgumentParser()
    add_option_flags(parser, More)
    assert parser.parse_args(["--no-repeat", "2"]).no_repeat == "2"
    model = option_model("MoreParams", More, _Strict, "")
    assert model.model_json_schema()["properties"]["no_repeat"]["maximum"] == 8
    with pytest.raises(OptionError, match="no_repeat: must be between 0 and 8, got 9"):
        caption("x.png", no_repeat=9)


# --- the same message for a bad value ------------------------------------------------------------------------------

# (task, {option: value}) of every kind of bad value: below and above a range, a wrong type, not finite, and the
# rules between options.
BAD = [
    ("caption", {"num_beams": 0}),
    ("caption", {"num_beams": 17}),
    ("caption", {"num_beams": "many"}),
    ("caption", {"num_beams": 2.5}),
    ("caption", {"max_new_tokens": 0}),
    ("caption", {"top_p": 0}),
    ("caption", {"top_p": 1.5}),
    ("caption", {"top_k": -1}),
    ("caption", {"temperature": 1e-300}),
    ("caption", {"temperature": 5e-324}),
    ("caption", {"temperature": 1e-45}),
    ("caption", {"temperature": "hot"}),
    ("caption", {"temperature": float("inf")}),
    ("caption", {"repetition_penalty": 1e-300}),
    ("caption", {"length_penalty": 1000}),
    ("caption", {"seed": -1}),
    ("caption", {"prompt": "a " * 300}),
    ("caption", {"min_new_tokens": 9, "max_new_tokens": 5}),
    ("caption", {"num_captions": 3}),
    ("caption", {"num_beams": 2, "num_captions": 3}),
    ("caption", {"num_beams": 2, "do_sample": True}),
    ("vqa", {"num_beams": 0}),
    ("vqa", {"max_new_tokens": "ten"}),
    ("vqa", {"min_new_tokens": 9, "max_new_tokens": 5}),
    ("vqa", {"answers": []}),
    ("vqa", {"answers": ["yes", " "]}),
]


def _id(case) -> str:
    return f"{case[0]}-" + "-".join(f"{k}={v!r}"[:30] for k, v in case[1].items())


def _cli_args(values: dict) -> list[str]:
    out = []
    for name, value in values.items():
        if value is True:
            out.append(flag(name))
        elif isinstance(value, list):
            import json

            out += [flag(name), json.dumps(value)]
        else:
            out += [flag(name), str(value)]
    return out


@pytest.mark.parametrize("task, values", BAD, ids=[_id(c) for c in BAD])
def test_a_bad_value_gets_the_same_message_on_every_face(
    task, values, captioner, answerer, client, png, tmp_path, capsys
):
    cls = OPTIONS[task]
    with pytest.raises(OptionError) as caught:
        cls(**values)
    expected, field = str(caught.value), caught.value.field
    assert expected.startswith(f"{field}: ") and field in values

    # the Python API
    image = make_images(1)[0]
    with pytest.raises(OptionError) as caught:
        captioner.caption(image, **values) if task == "caption" else answerer.answer(image, "what?", **values)
    assert str(caught.value) == expected

    # the batch jobs' options
    config = BatchConfig(task=task, model="m", input="i", out="o", options=TaskOptions(**values))
    with pytest.raises(OptionError) as caught:
        config.validate()
    assert str(caught.value) == expected

    representable = all(not isinstance(v, float) or math.isfinite(v) for v in values.values())
    if representable:  # JSON has no inf
        # the server: a 422 naming the field, with the same message
        body = {"images": [{"b64": __import__("base64").b64encode(png).decode()}], **values}
        if task == "vqa":
            body["questions"] = [["what is it?"]]
        r = client.post(f"/v1/{task}", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"] == expected and r.json()["error"]["field"] == field

    # the command lines: exit 2 and that message on one stderr line (before any model is loaded)
    image_path = tmp_path / "x.png"
    image_path.write_bytes(png)
    cli = ["caption", "--model", str(tmp_path / "no-model"), str(image_path)]
    if task == "vqa":
        cli = ["vqa", "--model", str(tmp_path / "no-model"), "--image", str(image_path), "--question", "what?"]
    batch = [task, "-m", str(tmp_path / "no-model"), "-i", str(tmp_path), "-o", str(tmp_path / "out")]
    for run, argv, prog in (
        (main, cli, f"blip {task}"),
        (lambda a: batch_main(a, prog="blip batch"), batch, f"blip batch {task}"),
    ):
        assert run([*argv, *_cli_args(values)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"{prog}: error: {expected}"], err


# --- sane ranges: nothing accepted crashes or overflows -----------------------------------------------------------


def _extremes() -> list[dict]:
    """Each end of every numeric caption option's range, with what makes the option count (sampling, beams)."""
    cases = []
    for name, spec in CaptionOptions.specs().items():
        if spec.kind not in ("int", "float"):
            continue
        ends = [spec.minimum, spec.maximum]
        if spec.exclusive_minimum:
            ends[0] = math.nextafter(spec.minimum, math.inf)  # the smallest accepted value (5e-324 for top_p)
        for end in ends:
            value = int(end) if spec.kind == "int" else float(end)
            base: dict = {"max_new_tokens": 4}
            if name in ("top_p", "top_k", "temperature", "seed", "num_captions"):
                base.update(do_sample=True, seed=1)
            if name in ("length_penalty", "num_beams"):
                base.update(num_beams=3)
            if name in ("max_new_tokens", "min_new_tokens"):
                base = {"max_new_tokens": 63, "min_new_tokens": 0}  # the tiny model's 64 positions, [DEC] first
                value = min(value, 63)
            cases.append({**base, name: value})
    cases += [{"repetition_penalty": p, "num_beams": b, "max_new_tokens": 6} for p in (0.01, 100.0) for b in (1, 3)]
    cases += [{"repetition_penalty": p, "do_sample": True, "seed": 2, "max_new_tokens": 6} for p in (0.01, 100.0)]
    cases += [{"temperature": 0.01, "top_k": 1, "do_sample": True, "seed": 3, "repetition_penalty": 100.0}]
    return cases


EXTREMES = _extremes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_extremes_of_every_range_give_finite_results(caption_dir, dtype):
    model = blip.load(caption_dir, dtype=dtype)
    image = make_images(1, seed=8)[0]
    for values in EXTREMES:
        captions = model.caption(image, **values)
        for caption in captions[0] if isinstance(captions[0], list) else captions:
            assert math.isfinite(caption.score), (values, caption)
            assert len(caption.token_ids) > 1, (values, caption)


def test_the_extremes_of_every_range_through_the_server(client, png):
    import base64

    image = {"b64": base64.b64encode(png).decode()}
    for values in EXTREMES:
        r = client.post("/v1/caption", json={"images": [image], **values})
        assert r.status_code == 200, (values, r.text)
        assert all(c["score"] is not None for c in r.json()["results"][0]["captions"]), (values, r.text)


@pytest.mark.parametrize(
    "values", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-45}, {"repetition_penalty": 1e-300}]
)
def test_the_values_that_crashed_are_refused_naming_the_field(values, captioner, client, png):
    import base64

    (name,) = values
    with pytest.raises(ValueError, match=f"^{name}: must be between"):
        captioner.caption(make_images(1)[0], do_sample=True, **values)
    body = {"images": [{"b64": base64.b64encode(png).decode()}], "do_sample": True, **values}
    r = client.post("/v1/caption", json=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == name, r.text


def test_form_fields_take_the_same_options(client, png):
    files = [("images", ("a.png", png, "image/png"))]
    r = client.post("/v1/caption/upload", files=files, data={"temperature": "1e-300", "do_sample": "true"})
    assert r.status_code == 422 and r.json()["error"]["message"] == str(_error(CaptionOptions, temperature=1e-300))
    r = client.post("/v1/vqa/upload", files=files, data={"questions": ["what?"], "answers": ["yes", "no"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["answers"][0]["text"] in ("yes", "no")


def _error(cls, **values) -> OptionError:
    try:
        cls(**values)
    except OptionError as e:
        return e
    raise AssertionError(f"{values} were accepted")


def test_options_are_validated_and_hashable():
    options = CaptionOptions(num_beams="3", do_sample=False, top_p="0.5")
    assert options.num_beams == 3 and options.top_p == 0.5
    assert hash(options) == hash(CaptionOptions(num_beams=3, top_p=0.5))
    assert VqaOptions(answers=["a", "b"]).answers == ("a", "b")
    assert isinstance(_error(CaptionOptions, temperature=0), ValueError)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        blip.Blip.caption(None, Image.new("RGB", (4, 4)), temprature=1.0)
