"""THE task options: every option of captioning, VQA (generate and rank) and matching, with its default, type,
range and help text, defined once. Everything else is derived from these classes:

- the Python API (`Blip.caption(images, prompt=None, num_beams=1, ...)`: its signature is generated, `takes_options`),
- the command lines (`blip caption|vqa`, `blip batch caption|vqa`: generated flags, `add_option_flags`),
- the server's request bodies (`/v1/caption`, `/v1/vqa` and their upload forms: generated fields, in
  `blip.serve.schemas`),
- the batch jobs' options and their fingerprint (`blip.jobs.runner.TaskOptions`, `describe()`).

A bad value raises `OptionError` (a ValueError) whose text, ``"<option>: <reason>"``, is the same on every face: the
API raises it, the CLIs print it on one line (exit 2), the server answers it with a 422 naming the field.

Ranges are chosen so that no accepted value can crash generation or turn into junk through float overflow: logits
are float32 (also for bf16/fp16 models), and temperature, repetition penalty and length penalty stay far from the
values that make ``logits / temperature``, ``logits * penalty`` or ``length ** length_penalty`` overflow or vanish.
Limits that depend on the model (prompt + new tokens within its positions) are checked by `check_model`; limits of a
server (max beams or tokens per request) are the server's own and apply on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:  # generation (hence torch) only when decoding: the command line parses its flags before torch loads
    from blip.api import Blip
    from blip.models.generation import GenerationConfig

KINDS = ("int", "float", "bool", "str", "texts")
_WHAT = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
SEED_MAX = 2**53  # seeds travel as JSON numbers: exact up to 2**53


class OptionError(ValueError):
    """A bad option value: ``str(e)`` is ``"<field>: <reason>"``, the same text on every face."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Spec:
    """What an option is: its kind, range and help (the default is the dataclass field's)."""

    kind: str  # one of KINDS; "texts" is a list of non-empty strings
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # minimum itself is not allowed
    nullable: bool = False  # None is a value (e.g. "no prompt", "no seed")
    max_length: int | None = None  # str: characters at most
    aliases: tuple[str, ...] = ()  # more command-line flags for it (e.g. --sample for --do-sample)
    metavar: str | None = None
    cli_help: str | None = None  # the flag's help when it differs (e.g. how a list is given on a command line)
    relevant: Callable[[Any], bool] | None = None  # does it change results for these options? (None: always)

    @property
    def annotation(self) -> Any:
        base = {"int": int, "float": float, "bool": bool, "str": str, "texts": list[str]}[self.kind]
        return base | None if self.nullable else base

    def range_text(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        low = f"> {_num(self.minimum)}" if self.exclusive_minimum else f">= {_num(self.minimum)}"
        if self.maximum is None:
            return low
        if self.minimum is None:
            return f"<= {_num(self.maximum)}"
        if self.exclusive_minimum:
            return f"> {_num(self.minimum)} and <= {_num(self.maximum)}"
        return f"between {_num(self.minimum)} and {_num(self.maximum)}"


def _num(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(default: Any, help: str, kind: str, **spec: Any) -> Any:
    """A dataclass field that is a task option."""
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r}")
    return field(default=default, metadata={"option": Spec(kind, help, **spec)})


def _coerce(name: str, spec: Spec, value: Any) -> Any:
    """The value as its kind, or OptionError. Text is read as the kind (command lines and forms send text)."""
    if value is None:
        if spec.nullable:
            return None
        raise OptionError(name, f"must be {_WHAT.get(spec.kind, 'a list of strings')}, got None")
    kind = spec.kind
    if kind == "int":
        out: Any = None
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                try:  # "2.0" is 2, as the number 2.0 is; "2.5" is refused as the number 2.5 is
                    value = float(value.strip())
                    out = int(value) if math.isfinite(value) and value.is_integer() else None
                except ValueError:
                    out = None
        if out is None:
            raise OptionError(name, f"must be an integer, got {value!r}")
        value = out
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise OptionError(name, f"must be a finite number, got {value!r}")
        try:
            value = float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            raise OptionError(name, f"must be a finite number, got {value!r}") from None
        if not math.isfinite(value):
            raise OptionError(name, f"must be a finite number, got {value!r}")
    elif kind == "bool":
        if isinstance(value, bool):
            pass
        elif isinstance(value, int) and value in (0, 1):
            value = bool(value)
        elif isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            value = value.strip().lower() in _TRUE
        else:
            raise OptionError(name, f"must be true or false, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise OptionError(name, f"must be a string, got {type(value).__name__}")
        if spec.max_length is not None and len(value) > spec.max_length:
            raise OptionError(name, f"must be at most {spec.max_length} characters, got {len(value)}")
    else:  # texts
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise OptionError(name, f"must be a list of strings, got {type(value).__name__}")
        if not value:
            raise OptionError(name, "must not be an empty list")
        for i, text in enumerate(value):
            if not isinstance(text, str) or not text.strip():
                raise OptionError(name, f"item {i} must be a non-empty string, got {text!r}")
        value = tuple(value)
    if kind in ("int", "float"):
        low, high = spec.minimum, spec.maximum
        too_low = low is not None and (value <= low if spec.exclusive_minimum else value < low)
        if too_low or (high is not None and value > high):
            raise OptionError(name, f"must be {spec.range_text()}, got {_num(value)}")
    return value


OptionsT = TypeVar("OptionsT", bound="TaskOptionsBase")


@dataclass(frozen=True)
class TaskOptionsBase:
    """Validated on construction: values are coerced to their kinds and checked against their ranges and against
    each other; an instance is always valid (model-dependent limits: `check_model`)."""

    task: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name, spec in self.specs().items():
            object.__setattr__(self, name, _coerce(name, spec, getattr(self, name)))
        self.check()

    def check(self) -> None:
        """Rules between options (ranges of single options are checked before)."""

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        return dict(_fields(cls)[0])

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dict(_fields(cls)[1])

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """One option's value checked on its own (the server's per-field validation uses this)."""
        return _coerce(name, cls.specs()[name], value)

    @classmethod
    def from_mapping(cls: type[OptionsT], values: Mapping[str, Any]) -> OptionsT:
        """Options from a mapping that may hold other keys too (parsed arguments, a request body)."""
        return cls(**{name: values[name] for name in cls.specs() if name in values})

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.specs()}

    def describe(self) -> dict[str, Any]:
        """The options that change results, as plain JSON (part of a batch job's fingerprint)."""
        out = {}
        for name, spec in self.specs().items():
            if spec.relevant is None or spec.relevant(self):
                out[name] = _plain(getattr(self, name))
        return out

    def check_model(self, blip: Blip) -> None:
        """Limits that depend on the model (raises OptionError); cheap, so every face calls it before any work."""


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Spec], dict[str, Any]]:
    """(spec, default) of each option field of `cls`, in order (read once per class)."""
    options = [f for f in dataclasses.fields(cls) if "option" in f.metadata]
    return {f.name: f.metadata["option"] for f in options}, {f.name: f.default for f in options}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def is_blip2(blip: Blip) -> bool:
    """Whether `blip` holds a BLIP-2 model (its config is a `Blip2Config`)."""
    from blip.blip2_config import Blip2Config

    return isinstance(blip.config, Blip2Config)


def embedding_shape(blip: Blip) -> tuple[int, ...]:
    """The ITC features of one image: `(E,)` for BLIP, `(Q, E)` for BLIP-2 (one per query token)."""
    if is_blip2(blip):
        return (blip.config.num_query_tokens, blip.config.image_text_hidden_size)
    return (blip.config.embed_dim,)


def _positions(blip: Blip) -> int:
    return int(blip.config.text.max_position_embeddings)


def _sampling(options: Any) -> bool:
    return bool(options.do_sample)


def _generating(options: Any) -> bool:
    return options.answers is None


def _templated(options: Any) -> bool:  # None (the checkpoint's template) leaves older job fingerprints as they were
    return options.answers is None and options.prompt_template is not None


def _ranking(options: Any) -> bool:
    return options.answers is not None


def _never(options: Any) -> bool:  # an option that changes how, not what (not part of a job's fingerprint)
    return False


DECODE_MODES = ("auto", "static", "eager")  # = blip.models.generation.DECODE_MODES (torch-free here)
_DECODE_HELP = (
    "decoding path, same results: static (fixed-shape steps over a static cache, replayed as CUDA graphs on a GPU), "
    "eager, or auto (static on CUDA, eager elsewhere); BLIP-2 with T5 decodes eagerly"
)


def _check_decode(options: Any) -> None:
    if options.decode not in DECODE_MODES:
        raise OptionError("decode", f"must be one of {', '.join(DECODE_MODES)}, got {options.decode!r}")


MAX_NEW_TOKENS = 1024  # a static bound for schemas; the model's positions bound it further (check_model)
MAX_BEAMS = 16
MAX_SEQUENCES = 16


@dataclass(frozen=True)
class CaptionOptions(TaskOptionsBase):
    """How to caption: greedy, beam search or nucleus/top-k sampling, optionally after a prompt."""

    task: ClassVar[str] = "caption"

    prompt: str | None = option(
        None, 'text the caption starts with, e.g. "a picture of"', "str", nullable=True, max_length=500
    )
    num_beams: int = option(1, "beam search width (1: greedy, or sampling)", "int", minimum=1, maximum=MAX_BEAMS)
    max_new_tokens: int = option(20, "most tokens to generate", "int", minimum=1, maximum=MAX_NEW_TOKENS)
    min_new_tokens: int = option(0, "fewest tokens to generate", "int", minimum=0, maximum=MAX_NEW_TOKENS)
    do_sample: bool = option(
        False,
        "nucleus/top-k sampling instead of greedy or beam search",
        "bool",
        aliases=("--sample",),
        relevant=_sampling,
    )
    top_p: float = option(
        0.9,
        "sampling: nucleus mass (1 keeps every token)",
        "float",
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        relevant=_sampling,
    )
    top_k: int = option(
        0,
        "sampling: keep the k most likely tokens (0: no limit)",
        "int",
        minimum=0,
        maximum=100_000,
        relevant=_sampling,
    )
    temperature: float = option(
        1.0,
        "sampling: temperature (lower is more conservative)",
        "float",
        minimum=0.01,
        maximum=100.0,
        relevant=_sampling,
    )
    repetition_penalty: float = option(
        1.0,
        "penalty on tokens already in the text (1: none; above 1 discourages repeats)",
        "float",
        minimum=0.01,
        maximum=100.0,
    )
    length_penalty: float = option(
        1.0,
        "beam search: score / length ** length_penalty (above 0 favours longer captions)",
        "float",
        minimum=-10.0,
        maximum=10.0,
    )
    num_captions: int = option(
        1, "captions per image (<= num_beams, or with do_sample)", "int", minimum=1, maximum=MAX_SEQUENCES
    )
    seed: int | None = option(
        None,
        "sampling: random seed (none: not reproducible)",
        "int",
        nullable=True,
        minimum=0,
        maximum=SEED_MAX,
        relevant=_sampling,
    )
    decode: str = option("auto", _DECODE_HELP, "str", max_length=16, metavar="{auto,static,eager}", relevant=_never)

    def check(self) -> None:
        _check_decode(self)
        if self.min_new_tokens > self.max_new_tokens:
            raise OptionError(
                "min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        if self.do_sample and self.num_beams > 1:
            raise OptionError("num_beams", "beam sampling is not supported: use do_sample with num_beams=1")
        if self.num_beams > 1 and self.num_captions > self.num_beams:
            raise OptionError("num_captions", f"must be <= num_beams ({self.num_beams}), got {self.num_captions}")
        if self.num_beams == 1 and not self.do_sample and self.num_captions > 1:
            raise OptionError(
                "num_captions", "greedy decoding gives one caption: use num_beams >= num_captions, or do_sample"
            )

    def generation(self) -> GenerationConfig:
        from blip.models.generation import GenerationConfig

        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            do_sample=self.do_sample,
            top_p=self.top_p,
            top_k=self.top_k,
            temperature=self.temperature,
            repetition_penalty=self.repetition_penalty,
            length_penalty=self.length_penalty,
            num_return_sequences=self.num_captions,
            seed=self.seed,
            decode=self.decode,
        )

    def check_model(self, blip: Blip) -> None:
        if is_blip2(blip):
            from blip.tasks.blip2 import check_caption_lengths

            check_caption_lengths(blip, self.prompt, self.max_new_tokens)
            return
        from blip.tasks.caption import prompt_prefix

        prefix, positions = len(prompt_prefix(blip, self.prompt)), _positions(blip)
        if prefix + self.max_new_tokens > positions:
            raise OptionError(
                "max_new_tokens",
                f"prompt ({prefix} tokens with [DEC]) + max_new_tokens ({self.max_new_tokens}) is over the model's "
                f"{positions} text positions",
            )


def read_text_list(spec: str) -> tuple[str, ...]:
    """A command line's list: a JSON list, a file holding one, or one item per line (of the file or the text)."""
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else spec
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError("answers", f"cannot read {spec}: {e}") from e
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        items = [line.strip() for line in text.splitlines() if line.strip()]
    return tuple(items)


@dataclass(frozen=True)
class VqaOptions(TaskOptionsBase):
    """How to answer: generate an answer (greedy or beam search), or rank a given list of answers."""

    task: ClassVar[str] = "vqa"

    answers: tuple[str, ...] | None = option(
        None,
        "rank these candidate answers instead of generating",
        "texts",
        nullable=True,
        cli_help="rank these answers instead of generating: a JSON list, or a file with one answer per line",
        metavar="LIST_OR_FILE",
        relevant=_ranking,
    )
    num_beams: int = option(
        1, "beam search width (1: greedy)", "int", minimum=1, maximum=MAX_BEAMS, relevant=_generating
    )
    max_new_tokens: int = option(
        10, "most tokens to generate", "int", minimum=1, maximum=MAX_NEW_TOKENS, relevant=_generating
    )
    min_new_tokens: int = option(
        0, "fewest tokens to generate", "int", minimum=0, maximum=MAX_NEW_TOKENS, relevant=_generating
    )
    prompt_template: str | None = option(
        None,
        'BLIP-2: the prompt a question is put in, "{}" where the question goes (none: the checkpoint\'s, '
        '"Question: {} Answer:")',
        "str",
        nullable=True,
        max_length=500,
        relevant=_templated,
    )
    decode: str = option("auto", _DECODE_HELP, "str", max_length=16, metavar="{auto,static,eager}", relevant=_never)

    def check(self) -> None:
        _check_decode(self)
        if self.min_new_tokens > self.max_new_tokens:
            raise OptionError(
                "min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        if self.prompt_template is not None and self.prompt_template.count("{}") != 1:
            raise OptionError("prompt_template", 'must contain "{}" once, where the question goes')

    def generation(self) -> GenerationConfig:
        return CaptionOptions(
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            decode=self.decode,
        ).generation()

    def check_model(self, blip: Blip) -> None:
        if is_blip2(blip):
            from blip.tasks.blip2 import check_vqa_lengths

            if self.answers is not None:
                raise OptionError("answers", "ranking given answers is for BLIP VQA checkpoints; BLIP-2 generates")
            check_vqa_lengths(blip, self.prompt_template, self.max_new_tokens)
            return
        if self.prompt_template is not None:
            raise OptionError(
                "prompt_template", "BLIP VQA checkpoints take the question as it is; prompt templates are for BLIP-2"
            )
        positions = _positions(blip)
        if self.answers is None:
            if 1 + self.max_new_tokens > positions:
                raise OptionError(
                    "max_new_tokens",
                    f"[DEC] + max_new_tokens ({self.max_new_tokens}) is over the model's {positions} text positions",
                )
            return
        for i, answer in enumerate(self.answers):
            if len(blip.tokenizer.encode(answer)) > positions:
                raise OptionError("answers", f"item {i} has more tokens than the model's {positions} text positions")


@dataclass(frozen=True)
class MatchOptions(TaskOptionsBase):
    """Image-text matching has no options yet; new ones go here and appear on every face."""

    task: ClassVar[str] = "match"


OPTIONS: dict[str, type[TaskOptionsBase]] = {"caption": CaptionOptions, "vqa": VqaOptions, "match": MatchOptions}


# --- the Python API ---------------------------------------------------------------------------------------------------


def takes_options(cls: type[TaskOptionsBase]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the method takes the options of `cls` as parameters after its own (positional or keyword, with the
    options' defaults: `inspect.signature` shows them) and receives them validated, as `options=cls(...)`."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(method).parameters.values() if p.name != "options"]
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        added = [
            inspect.Parameter(name, kind, default=cls.defaults()[name], annotation=spec.annotation)
            for name, spec in cls.specs().items()
        ]
        signature = inspect.signature(method).replace(parameters=own + added)
        own_names = [p.name for p in own]

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)  # TypeError for an unknown or missing argument, as Python says
            bound.apply_defaults()
            values = bound.arguments
            return method(**{n: values[n] for n in own_names}, options=cls.from_mapping(values))

        call.__signature__ = signature  # type: ignore[attr-defined]
        return call

    return wrap


# --- command lines ----------------------------------------------------------------------------------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser | Any, cls: type[TaskOptionsBase]):
    """A flag per option (`--max-new-tokens`, ...), with the option's default and help. Values are kept as given and
    checked by `options_from_args`, so a bad value gets the same one-line message as everywhere else."""
    for name, spec in cls.specs().items():
        default = cls.defaults()[name]
        flags = [flag(name), *spec.aliases]
        described = spec.cli_help or spec.help
        if spec.kind == "bool":
            parser.add_argument(*flags, dest=name, action="store_true", default=default, help=described)
            continue
        extra = [spec.range_text()] if spec.range_text() else []
        if default is not None:
            extra.append(f"default: {default}")
        help_text = described + (f" ({'; '.join(extra)})" if extra else "")
        metavar = spec.metavar or ("TEXT" if spec.kind == "str" else name.upper())
        parser.add_argument(*flags, dest=name, default=default, metavar=metavar, help=help_text.replace("%", "%%"))


def option_values(args: argparse.Namespace | Mapping[str, Any], cls: type[TaskOptionsBase]) -> dict[str, Any]:
    """The options given by parsed arguments (lists given on a command line read with `read_text_list`)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out = {}
    for name, spec in cls.specs().items():
        if name not in values:
            continue
        value = values[name]
        if spec.kind == "texts" and isinstance(value, str):
            value = read_text_list(value)
        out[name] = value
    return out


def options_from_args(args: argparse.Namespace, cls: type[OptionsT]) -> OptionsT:
    """Validated options from parsed arguments; OptionError for a bad value."""
    return cls(**option_values(args, cls))
