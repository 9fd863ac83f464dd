"""`blip capfilt ...` (wired into `blip` by blip.cli; also `python -m blip.capfilt ...`).

Exit codes: 0 ok, 1 finished with failed rows (listed in errors.jsonl), 2 usage or fatal error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from blip.capfilt.core import DATASET, CapfiltConfig, run_capfilt
from blip.devices import DeviceError, add_device_flag
from blip.jobs.cli import (
    EXIT_FAILED_ROWS,
    EXIT_OK,
    EXIT_USAGE,
    add_engine_flags,
    disk_error,
    fatal,
    setup_logging,
)
from blip.jobs.job import EngineOptions

__all__ = ["EXIT_FAILED_ROWS", "EXIT_OK", "EXIT_USAGE", "build_parser", "capfilt_main", "main"]

_DEFAULTS = CapfiltConfig()


def build_parser(prog: str = "blip capfilt") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="CapFilt: sample synthetic captions for every web image with --captioner, score the web text and "
        "each synthetic text with the --filter's ITM head, keep those with P(match) >= --threshold, and write the "
        f"records, errors.jsonl and the bootstrapped dataset ({DATASET}) to --out. Rerunning the same command "
        "resumes. Example: blip capfilt --captioner runs/caption_shapes/model --filter runs/retrieval_shapes/model "
        "--data runs/shapes --out runs/capfilt --keep-clean runs/shapes",
    )
    g = p.add_argument_group("job")
    g.add_argument("--captioner", required=True, help="a model with a caption head: hub id, HF folder or .pth")
    g.add_argument("--filter", required=True, help="a model with an ITM head (a retrieval fine-tune)")
    g.add_argument(
        "--data",
        required=True,
        help="a shapes-world folder (its web.jsonl), a .jsonl/.csv manifest (image + caption/text columns), a "
        "folder of images, or WebDataset .tar shards",
    )
    g.add_argument("--out", required=True, help="output folder (created; rerun to resume)")
    g.add_argument(
        "--keep-clean",
        metavar="CLEAN",
        help="human-annotated captions to add unfiltered: a caption manifest or a shapes folder (its clean.jsonl)",
    )
    g.add_argument("--overwrite", action="store_true", help="discard earlier results in --out and start over")

    g = p.add_argument_group("captioner and filter")
    g.add_argument("--num-captions", type=int, default=_DEFAULTS.num_captions, help="synthetic captions per image")
    g.add_argument(
        "--num-beams", type=int, default=_DEFAULTS.num_beams, help="above 1: beam search instead of nucleus sampling"
    )
    g.add_argument("--top-p", type=float, default=_DEFAULTS.top_p, help="nucleus sampling mass (default: 0.9)")
    g.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, help="sample among the top k tokens (default: 50)")
    g.add_argument(
        "--threshold",
        type=float,
        default=_DEFAULTS.threshold,
        help="keep a text when its score (P(match), see --itc-weight) >= this (default 0.5)",
    )
    g.add_argument(
        "--itc-weight",
        type=float,
        default=_DEFAULTS.itc_weight,
        help="> 0: score = sigmoid(logit P(match) + this x ITC cosine) (default 0: ITM alone, the paper's)",
    )
    g.add_argument("--prompt", default=_DEFAULTS.prompt, help='captioner prompt (default: "a picture of ")')
    g.add_argument("--max-new-tokens", type=int, default=_DEFAULTS.max_new_tokens)
    g.add_argument("--min-new-tokens", type=int, default=_DEFAULTS.min_new_tokens)
    g.add_argument("--repetition-penalty", type=float, default=_DEFAULTS.repetition_penalty)
    g.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="sampling seed (per row: a hash of seed and row id)"
    )

    g = p.add_argument_group("running")
    add_device_flag(g)
    g.add_argument("--dtype", default=_DEFAULTS.dtype, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--tokenizer", help="tokenizer folder or vocab.txt, for checkpoints that ship none")
    g.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="rows per batch (default: 32)")
    g.add_argument("--shard-size", type=int, default=_DEFAULTS.shard_size, help="rows per output shard")
    g.add_argument(
        "--workers", type=int, help="image-decoding processes (default: by CPU count and device; 0: threads here)"
    )
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_engine_flags(g)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    g.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    return p


def capfilt_main(argv: list[str] | None = None, prog: str = "blip capfilt") -> int:
    """`blip capfilt --captioner M1 --filter M2 --data WEB --out DIR ...`; returns the exit code."""
    from blip.data.manifests import DataError
    from blip.jobs.lock import OutputBusyError
    from blip.jobs.runner import JobError
    from blip.jobs.sources import InputError
    from blip.jobs.writer import OutputError
    from blip.transforms import ImageDecodeError
    from blip.weights.load import CheckpointError

    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help: 0; a bad option: argparse printed the usage, 2
        return int(e.code or 0)
    setup_logging(args.verbose)
    try:
        EngineOptions.of(args).check_device(args.device)
    except DeviceError as e:
        return fatal(prog, str(e))
    for flag in ("data", "keep_clean"):
        value = getattr(args, flag)
        if value and not any(c in value for c in "*?[{") and not Path(value).expanduser().exists():
            return fatal(prog, f"--{flag.replace('_', '-')} {value}: no such file or folder")
    cfg = CapfiltConfig(
        num_captions=args.num_captions,
        num_beams=args.num_beams,
        top_p=args.top_p,
        top_k=args.top_k,
        threshold=args.threshold,
        itc_weight=args.itc_weight,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        repetition_penalty=args.repetition_penalty,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        shard_size=args.shard_size,
        workers=args.workers,
        keep_clean=args.keep_clean,
        overwrite=args.overwrite,
        tokenizer=args.tokenizer,
        **dataclasses.asdict(EngineOptions.of(args)),  # CapfiltConfig's engine fields are EngineOptions' own
    )
    try:
        summary = run_capfilt(args.captioner, args.filter, args.data, args.out, cfg, progress=args.progress)
    except (
        InputError,
        DataError,
        OutputError,
        CheckpointError,
        JobError,
        ImageDecodeError,
        FileNotFoundError,
        ValueError,
    ) as e:
        return fatal(prog, str(e))
    except OSError as e:  # a full disk, a read-only folder: finished shards are kept
        return fatal(prog, disk_error(e, args.out))
    except (OutputBusyError, RuntimeError) as e:  # another job on --out; an optional package that is missing (Ray)
        return fatal(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if not summary.primary:
        return summary.exit_code
    verb = "resumed" if summary.resumed else "ran"
    print(
        f"{prog}: {verb} in {summary.seconds:.1f}s: {summary.rows} rows, {summary.failed} failed; web texts kept "
        f"{summary.web_kept}/{summary.web_texts}, synthetic kept {summary.synthetic_kept}/{summary.synthetic_texts}"
        + (f", clean {summary.clean_texts}" if summary.clean_texts else "")
        + f" -> {summary.texts_out} texts in {summary.dataset or summary.out_dir}",
        file=sys.stderr,
    )
    if summary.failed:
        print(f"{prog}: failed rows and reasons are in {summary.errors}", file=sys.stderr)
    return summary.exit_code


def main() -> int:
    return capfilt_main(sys.argv[1:], prog="python -m blip.capfilt")
