"""`blip` command line. Exit codes: 0 ok, 1 some rows failed (reported), 2 usage or fatal error (no traceback)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blip.tasks.options import CaptionOptions, OptionError, VqaOptions, add_option_flags, options_from_args

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE = 0, 1, 2
VERBOSE_HELP = "log what happens: loading (source, layout, weights file, dtype/device, resizing, dropped keys), ..."
# Commands with their own parser that has no -v of its own: `blip serve -v` just turns on INFO logging here.
PASSTHROUGH_WITHOUT_VERBOSE = frozenset({"serve"})
STATUS_AFTER_S = 1.0  # a step still running after this long gets a status line on stderr (when it is a terminal)
# One-shot commands whose OpenMP threads sleep while they wait instead of spinning. When other processes keep the
# cores busy, a spinning thread holds a core that the thread it waits for needs: a base-model caption took 6.5-13 s
# instead of 2-2.7 s that way (2 threads, 2-core AMD EPYC, a busy machine). On a quiet machine spinning is ~25%
# faster, so long-running commands (serve, batch, train, demo) keep OpenMP's default. The user's setting wins.
PASSIVE_OPENMP_COMMANDS = frozenset({"caption", "vqa", "match", "similarity", "explain", "reason"})

_logger = logging.getLogger("blip.cli")


class CliError(Exception):
    """A fatal, user-facing error: printed as one line, exit code 2."""


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        help="hub id (Salesforce/blip-...), short name (see `blip list`), local HF folder or .pth",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder or vocab.txt, for checkpoints that ship none")


def _common(parser: argparse.ArgumentParser) -> None:
    from blip.devices import add_device_flag

    _model_flags(parser)
    add_device_flag(parser)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights/compute dtype (default: float32)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--format", choices=["text", "jsonl"], default="text", help="output format (default: text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip",
        description="BLIP vision-language models: caption images, answer "
        "questions, match and compare images with text, convert checkpoints.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "caption",
        help="write a caption for each image",
        description="Caption images. Example: blip caption --model DIR a.jpg b.png --num-beams 3 --format jsonl",
    )
    _common(p)
    p.add_argument("images", nargs="+", help="image files")
    add_option_flags(p.add_argument_group("generation"), CaptionOptions)

    p = sub.add_parser(
        "vqa",
        help="answer questions about images",
        description="Answer questions. One --image with several --question flags asks each question "
        "about that image; equal numbers pair them up. Example: blip vqa --model DIR "
        '--image a.jpg --question "how many dogs?" --question "what colour?"',
    )
    _common(p)
    p.add_argument("--image", action="append", required=True, help="image file (repeatable)")
    p.add_argument("--question", action="append", required=True, help="question (repeatable)")
    add_option_flags(p.add_argument_group("answering"), VqaOptions)

    p = sub.add_parser(
        "match",
        help="image-text matching probability (ITM head)",
        description="P(match) for each image-text pair; one image with several texts, or pairwise.",
    )
    _common(p)
    p.add_argument("--image", action="append", required=True, help="image file (repeatable)")
    p.add_argument("--text", action="append", required=True, help="text (repeatable)")

    p = sub.add_parser(
        "reason",
        help="visual reasoning (NLVR2): is a statement about a pair of images true?",
        description="P(true) of each statement about the image pair (--image-a, --image-b), from an NLVR2 "
        "checkpoint. Repeated flags pair up in order; a flag given once goes with every pair. Example: blip reason "
        '--model model_base_nlvr.pth --image-a left.jpg --image-b right.jpg --statement "both images show a dog"',
    )
    _common(p)
    p.add_argument("--image-a", action="append", required=True, help="the left image of a pair (repeatable)")
    p.add_argument("--image-b", action="append", required=True, help="the right image of a pair (repeatable)")
    p.add_argument("--statement", action="append", required=True, help="a statement about the pair (repeatable)")

    p = sub.add_parser("similarity", help="contrastive (ITC) cosine similarity of every image with every text")
    _common(p)
    p.add_argument("--image", action="append", required=True, help="image file (repeatable)")
    p.add_argument("--text", action="append", required=True, help="text (repeatable)")

    p = sub.add_parser(
        "explain",
        help="Grad-CAM heat maps of image-text matching: where the ITM head looks, per word (PNGs + HTML)",
        description="Write, for one image and one text, the image with a Grad-CAM heat overlay for each word and for "
        "the whole text (the ITM match logit's gradient times the text's attention on the image patches), a sheet of "
        "all of them and an index.html showing them. Needs a retrieval (ITM) checkpoint. Example: blip explain "
        '--model Salesforce/blip-itm-base-coco --image a.jpg --text "a dog on a beach" --out maps/',
    )
    _common(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--text", required=True, help="the text to explain")
    p.add_argument("--out", required=True, help="folder to write the PNGs and index.html into")
    p.add_argument(
        "--layer",
        type=int,
        help="cross-attention layer of the image-grounded encoder, 0-based (default: the middle one, 6 of 12)",
    )

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (e.g. an original .pth) to a Hugging Face folder",
        description="Load any checkpoint blip reads and save it as a complete Hugging Face folder.",
    )
    p.add_argument("source", help="checkpoint: .pth file, HF folder or hub id")
    p.add_argument("output", help="folder to write")
    p.add_argument(
        "--kind",
        choices=["caption", "vqa", "retrieval", "nlvr"],
        help="which model to take out of a multi-part (pretrain) checkpoint (nlvr: an NLVR2 model started from it)",
    )
    p.add_argument("--image-size", type=int, help="resize the position embeddings for this input size")
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt (original .pth files ship none)")
    p.add_argument(
        "--config",
        help="config.json (or its folder) describing the model, for a .pth whose sizes "
        "cannot be read off its shapes (attention heads other than 64 wide)",
    )

    p = sub.add_parser(
        "export",
        help="export a checkpoint for ONNX Runtime (serve it without PyTorch: blip.export.onnx_runtime)",
        description="Write the graphs a runtime needs for the checkpoint's kind (vision encoder; ITC text encoder; "
        "image-grounded encoder + ITM head or VQA question encoder; cross-attention K/V and a decoder step with an "
        "explicit KV cache), a manifest.json and the tokenizer. Example: blip export --model DIR --out onnx/",
    )
    _model_flags(p)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", default="onnx", help="export format (default and only one: onnx)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or float16")
    p.add_argument(
        "--parts", nargs="+", help="only these parts (default: all the checkpoint's; e.g. vision cross_kv decoder)"
    )

    sub.add_parser("list", help="list the published checkpoints blip knows by name")

    p = sub.add_parser("data", help="generate datasets (the synthetic shapes world)")
    p.add_argument("dataset", choices=["shapes", "shapes-video"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the generator (see `blip data shapes -h`)")

    for name, (_, helptext) in PASSTHROUGH.items():
        sub.add_parser(name, help=helptext, add_help=False)

    p = sub.add_parser(
        "demo",
        help="the paper's CapFilt story on the shapes world, end to end on a CPU (what `make demo` runs)",
        description="Generate the shapes world, pretrain on noisy web captions, fine-tune a captioner and a filter, "
        "run CapFilt, pretrain again on the bootstrapped data and compare both models; writes metrics.json and "
        "report.html to --out. Rerunning resumes (finished stages are kept).",
    )
    p.add_argument("--out", help="output folder (default: runs/demo; with --seeds runs/demo_seeds)")
    p.add_argument("--config", help="demo config file (default: configs/demo_shapes.py)")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, help="seed of the world, the models and the sampling (default: the config's)")
    seed.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="one run per seed in <out>/seed<N>, then their spread (mean ± std) in <out>/seeds.json, seeds.md and "
        "report.html",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's; 2 in demo_shapes.py)")
    p.add_argument(
        "--processes",
        type=int,
        help="fine-tunes that need nothing of each other run side by side in this many one-thread processes "
        "(default: the config's; 2 in demo_shapes.py; 1 when other work shares the cores)",
    )
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the plumbing in seconds, learns nothing")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also the paper's ablations (captioner/filter alone, beam search, shared parameters, a second round): "
        "five more arms, about 3x the demo's time",
    )
    for name, command in sub.choices.items():  # -v after the command too (`blip caption -v ...`)
        if name not in PASSTHROUGH:
            command.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


# --- helpers ---------------------------------------------------------------------------------------------------


# integer flags that must be >= 1 where a command has them
COUNT_FLAGS = ("batch_size", "image_size", "threads", "processes")


def _check_counts(args: argparse.Namespace) -> None:
    """A zero or negative count is a one-line usage error naming the flag (not a crash deep inside)."""
    for name in COUNT_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_device(device: str) -> None:
    """An unusable --device is a one-line usage error before anything is loaded."""
    from blip.devices import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as e:
        raise CliError(str(e)) from e


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """Say `message` on stderr if the step is still running after `STATUS_AFTER_S` seconds (environment:
    BLIP_STATUS_AFTER_S) and stderr is a terminal: a user waiting for a base model should not wait in silence, and
    pipes, logs and `--format jsonl` consumers get nothing extra."""
    try:
        after = float(os.environ.get("BLIP_STATUS_AFTER_S", STATUS_AFTER_S))
    except ValueError:
        after = STATUS_AFTER_S
    if not sys.stderr.isatty():
        yield
        return
    timer = threading.Timer(after, lambda: print(message, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _load(args: argparse.Namespace):
    import blip
    from blip.weights.load import CheckpointError

    _logger.info("loading %s (device %s, dtype %s)", args.model, args.device, args.dtype or "float32")
    started = time.perf_counter()
    try:
        with status(f"blip {args.command}: loading {args.model} ..."):
            model = blip.load(
                args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, batch_size=args.batch_size
            )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    log_load_report(model, time.perf_counter() - started)
    return model


def log_load_report(model: Any, seconds: float) -> None:
    """What loading did, at INFO (`-v`): source, layout and weights file, size, dtype/device, resizing, drops."""
    report = model.report
    _logger.info(
        "loaded %s in %.1fs: a %r model (%.2fM parameters), %s on %s",
        model.source,
        seconds,
        model.config.kind,
        model.model.num_parameters() / 1e6,
        str(model.dtype).removeprefix("torch."),
        model.device,
    )
    if report is None:
        return
    _logger.info("weights: %s (%s layout)", report.weights_file, report.layout)
    if report.resized_position_embedding:
        old, new = report.resized_position_embedding
        _logger.info("resized the position embedding from %d to %d patches", old, new)
    if report.dropped_keys:
        shown = ", ".join(report.dropped_keys[:5]) + (", ..." if len(report.dropped_keys) > 5 else "")
        _logger.info("dropped %d training-only or unused entries: %s", len(report.dropped_keys), shown)


def _decode_all(paths: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Decode every image once; failures are collected per path instead of stopping the run."""
    from blip.transforms import ImageDecodeError, load_image

    images, errors = {}, {}
    for path in dict.fromkeys(paths):
        try:
            images[path] = load_image(path, name=path)
        except (ImageDecodeError, OSError) as e:
            errors[path] = str(e)
    return images, errors


def _emit(args: argparse.Namespace, row: dict[str, Any], text: str) -> None:
    print(json.dumps(row, ensure_ascii=False) if args.format == "jsonl" else text, flush=True)


def _report_errors(args: argparse.Namespace, errors: dict[str, str]) -> int:
    for path, message in errors.items():
        if args.format == "jsonl":
            print(json.dumps({"image": path, "error": message}), flush=True)
        print(f"error: {message}", file=sys.stderr)
    return EXIT_FAILED_ROWS if errors else EXIT_OK


# --- commands --------------------------------------------------------------------------------------------------


def _options(args: argparse.Namespace, cls: type[Any]) -> Any:
    try:
        return options_from_args(args, cls)
    except OptionError as e:
        raise CliError(str(e)) from e


def _check_model(options: Any, model: Any) -> None:
    """The model's limits (e.g. prompt + new tokens within its positions), before any image is read."""
    try:
        options.check_model(model)
    except OptionError as e:
        raise CliError(str(e)) from e


def cmd_caption(args: argparse.Namespace) -> int:
    options = _options(args, CaptionOptions)
    model = _load(args)
    _check_model(options, model)
    images, errors = _decode_all(args.images)
    good = [p for p in args.images if p in images]
    if good:
        try:
            with status(f"blip caption: captioning {_plural(len(good), 'image')} ..."):
                results = model.caption([images[p] for p in good], **options.to_dict())
        except ValueError as e:
            raise CliError(str(e)) from e
        for path, result in zip(good, results):
            for cap in result if isinstance(result, list) else [result]:
                _emit(args, {"image": path, "caption": cap.text, "score": cap.score}, f"{path}\t{cap.text}")
    return _report_errors(args, errors)


def _pairs(images: list[str], texts: list[str], what: str) -> list[tuple[str, str]]:
    if len(images) == 1:
        return [(images[0], t) for t in texts]
    if len(texts) == 1:
        return [(i, texts[0]) for i in images]
    if len(images) != len(texts):
        raise CliError(f"{len(images)} --image but {len(texts)} --{what}: give one image, one {what}, or equal numbers")
    return list(zip(images, texts))


def cmd_vqa(args: argparse.Namespace) -> int:
    pairs = _pairs(args.image, args.question, "question")
    for _, question in pairs:
        if not question.strip():
            raise CliError("a --question is empty")
    options = _options(args, VqaOptions)
    model = _load(args)
    _check_model(options, model)
    images, errors = _decode_all(args.image)
    good = [(i, q) for i, q in pairs if i in images]
    if good:
        try:
            with status(f"blip vqa: answering {_plural(len(good), 'question')} ..."):
                results = model.answer([images[i] for i, _ in good], [q for _, q in good], **options.to_dict())
        except ValueError as e:
            raise CliError(str(e)) from e
        for (path, question), ans in zip(good, results):
            _emit(
                args,
                {"image": path, "question": question, "answer": ans.text, "score": ans.score},
                f"{path}\t{question}\t{ans.text}",
            )
    return _report_errors(args, errors)


def cmd_match(args: argparse.Namespace) -> int:
    pairs = _pairs(args.image, args.text, "text")
    model = _load(args)
    images, errors = _decode_all(args.image)
    good = [(i, t) for i, t in pairs if i in images]
    if good:
        try:
            with status(f"blip match: scoring {_plural(len(good), 'pair')} ..."):
                probs = model.match([images[i] for i, _ in good], [t for _, t in good])
        except ValueError as e:
            raise CliError(str(e)) from e
        for (path, text), prob in zip(good, probs):
            _emit(args, {"image": path, "text": text, "score": prob}, f"{path}\t{text}\t{prob:.4f}")
    return _report_errors(args, errors)


def cmd_reason(args: argparse.Namespace) -> int:
    from blip.api import reason_rows

    def one_or_all(values: list[str]) -> str | list[str]:
        return values[0] if len(values) == 1 else values  # a flag given once goes with every pair

    try:
        firsts, seconds, statements = reason_rows(
            one_or_all(args.image_a), one_or_all(args.image_b), one_or_all(args.statement)
        )
    except (TypeError, ValueError) as e:
        message = str(e).replace("image_a", "--image-a").replace("image_b", "--image-b")
        raise CliError(message.replace("statements", "--statement")) from e
    model = _load(args)
    images, errors = _decode_all(firsts + seconds)
    rows = [r for r in zip(firsts, seconds, statements) if r[0] in images and r[1] in images]
    if rows:
        try:
            with status(f"blip reason: judging {_plural(len(rows), 'statement')} ..."):
                verdicts = model.reason(
                    [images[a] for a, _, _ in rows], [images[b] for _, b, _ in rows], [s for *_, s in rows]
                )
        except ValueError as e:
            raise CliError(str(e)) from e
        for (a, b, statement), v in zip(rows, verdicts):
            row = {"image_a": a, "image_b": b, "statement": statement, "label": v.label, "score": v.score}
            _emit(args, row, f"{a}\t{b}\t{statement}\t{str(v.label).lower()}\t{v.score:.4f}")
    return _report_errors(args, errors)


def cmd_similarity(args: argparse.Namespace) -> int:
    model = _load(args)
    images, errors = _decode_all(args.image)
    good = [p for p in args.image if p in images]
    if good:
        try:
            what = f"{_plural(len(good), 'image')} and {_plural(len(args.text), 'text')}"
            with status(f"blip similarity: embedding {what} ..."):
                sims = model.similarity([images[p] for p in good], args.text)
        except ValueError as e:
            raise CliError(str(e)) from e
        for path, row in zip(good, sims.tolist()):
            for text, sim in zip(args.text, row):
                _emit(args, {"image": path, "text": text, "score": sim}, f"{path}\t{text}\t{sim:.4f}")
    return _report_errors(args, errors)


def cmd_explain(args: argparse.Namespace) -> int:
    if not args.text.strip():
        raise CliError("--text is empty")
    model = _load(args)
    images, errors = _decode_all([args.image])
    if args.image in images:
        from blip.tasks.explain import write_explanation

        image = images[args.image]
        try:
            with status("blip explain: computing the maps ..."):
                result = model.explain(image, args.text, layer=args.layer)
        except ValueError as e:
            raise CliError(str(e)) from e
        page = write_explanation(image, result, args.out)
        row = {
            "image": args.image,
            "text": args.text,
            "score": result.score,
            "layer": result.layer,
            "words": result.words,
            "html": str(page),
        }
        summary = f"{args.image}\t{args.text}\t{result.score:.4f}\t{_plural(len(result.words), 'word')} -> {page}"
        _emit(args, row, summary)
    return _report_errors(args, errors)


def cmd_convert(args: argparse.Namespace) -> int:
    import blip
    from blip.weights.load import CheckpointError

    started = time.perf_counter()
    try:
        model = blip.load(
            args.source, kind=args.kind, image_size=args.image_size, tokenizer=args.tokenizer, config=args.config
        )
        log_load_report(model, time.perf_counter() - started)
        model.save(args.output)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    report = model.report
    print(
        f"wrote {args.output}: a {model.config.kind!r} model ({model.model.num_parameters() / 1e6:.2f}M parameters) "
        f"from {report.layout} layout {report.weights_file}"
    )
    if report.dropped_keys:
        print(
            f"dropped {len(report.dropped_keys)} training-only or unused entries "
            f"(e.g. {', '.join(report.dropped_keys[:3])})"
        )
    if report.resized_position_embedding:
        old, new = report.resized_position_embedding
        print(f"resized the position embedding from {old} to {new} patches")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import blip
    from blip.export import ExportError, check_request, export
    from blip.weights.load import CheckpointError

    try:
        check_request(args.format, args.dtype)  # before loading anything
        model = blip.load(args.model, tokenizer=args.tokenizer)
        with status(f"blip export: writing {args.out} ..."):
            manifest = export(model, args.out, format=args.format, dtype=args.dtype, parts=args.parts)
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    parts = ", ".join(manifest["parts"])
    print(f"wrote {args.out}: {parts} ({manifest['dtype']}) of a {manifest['kind']!r} model, manifest.json, tokenizer/")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from blip.weights.registry import PRETRAINED

    for name, info in PRETRAINED.items():
        print(f"{name:21s} {info.hub_id:42s} {info.kind:10s} {info.vision}  {info.description}")
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    from blip.data import shapes

    if args.dataset == "shapes-video":  # short clips of the shapes world (blip.data.shapes.video; needs PyAV)
        from blip.data.shapes.video import cli_main as video_cli

        return video_cli(args.args)
    verbose = [a for a in args.args if a in ("-v", "--verbose")]
    if verbose:  # `blip data shapes -v ...`: the generator's own parser has no -v
        logging.getLogger().setLevel(logging.INFO)
    return shapes.cli_main([a for a in args.args if a not in verbose])


def cmd_demo(args: argparse.Namespace) -> int:
    from blip.demo import DemoConfigError, run_demo
    from blip.demo.seeds import run_seeds

    try:
        if args.seeds:
            return run_seeds(
                Path(args.out or "runs/demo_seeds"),
                args.seeds,
                config=args.config,
                threads=args.threads,
                processes=args.processes,
                smoke=args.smoke,
                ablations=args.ablations,
            )
        return run_demo(
            Path(args.out or "runs/demo"),
            config=args.config,
            seed=args.seed,
            threads=args.threads,
            processes=args.processes,
            smoke=args.smoke,
            ablations=args.ablations,
        )
    except DemoConfigError as e:
        raise CliError(str(e)) from e


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "caption": cmd_caption,
    "vqa": cmd_vqa,
    "match": cmd_match,
    "similarity": cmd_similarity,
    "reason": cmd_reason,
    "explain": cmd_explain,
    "convert": cmd_convert,
    "export": cmd_export,
    "list": cmd_list,
    "data": cmd_data,
    "demo": cmd_demo,
}


def _passthrough(module: str, function: str, prog: str | None = None) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        entry = getattr(importlib.import_module(module), function)
        return entry(argv, prog=prog) if prog else entry(argv)

    return run


# Subcommands with their own parsers (`blip train -h` shows theirs): everything after the name is theirs.
PASSTHROUGH: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_passthrough("blip.serve.cli", "cli_main"), "run the HTTP server (see `blip serve -h`)"),
    "batch": (
        _passthrough("blip.jobs.cli", "batch_main", "blip batch"),
        "caption/answer/match/embed a folder, manifest or shards, resumably (see `blip batch -h`)",
    ),
    "retrieve": (
        _passthrough("blip.jobs.cli", "retrieve_main", "blip retrieve"),
        "search an index built by `blip batch embed` (ITC top-k, ITM re-rank)",
    ),
    "capfilt": (
        _passthrough("blip.capfilt.cli", "capfilt_main", "blip capfilt"),
        "bootstrap a noisy dataset: synthetic captions + ITM filter (see `blip capfilt -h`)",
    ),
    "train": (_passthrough("blip.train.cli", "cli_main"), "train or fine-tune (see `blip train -h`)"),
    "eval": (_passthrough("blip.train.cli", "eval_main"), "evaluate a model: caption, VQA or retrieval metrics"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is not None and argv[command_at] in PASSIVE_OPENMP_COMMANDS and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
    if command_at is not None and argv[command_at] in PASSTHROUGH and set(argv[:command_at]) <= {"-v", "--verbose"}:
        rest = argv[command_at + 1 :]
        verbose = bool(command_at)
        if argv[command_at] in PASSTHROUGH_WITHOUT_VERBOSE and {"-v", "--verbose"} & set(rest):
            rest = [a for a in rest if a not in ("-v", "--verbose")]
            verbose = True
        if verbose:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        run, _ = PASSTHROUGH[argv[command_at]]
        try:
            return run(rest)
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        _check_counts(args)
        if getattr(args, "device", None) is not None:
            _check_device(args.device)
        return COMMANDS[args.command](args)
    except CliError as e:
        print(f"blip {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
