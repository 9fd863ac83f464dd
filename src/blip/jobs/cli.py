"""`blip batch ...` and `blip retrieve ...` (wired into `blip` by blip.cli; also `python -m blip.jobs batch|retrieve`).

Exit codes: 0 ok, 1 finished with failed rows (listed in errors.jsonl), 2 usage or fatal error (one line, no traceback).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from blip.devices import DeviceError, add_device_flag, resolve_device
from blip.jobs.batch import ENGINES, BatchConfig, EngineOptions, run_batch
from blip.jobs.index import INDEX_KINDS
from blip.jobs.lock import OutputBusyError
from blip.jobs.runner import JobError, TaskOptions
from blip.jobs.sources import IMAGE_EXTENSIONS, INPUT_KINDS, InputError, InputOptions
from blip.jobs.video import MEDIA
from blip.jobs.writer import EMBED_FORMATS, OUTPUT_FORMATS, OutputError
from blip.tasks.options import OPTIONS, CaptionOptions, VqaOptions, add_option_flags, option_values

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE = 0, 1, 2

_logger = logging.getLogger(__name__)


class _UsageError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job")
    g.add_argument("--model", "-m", required=True, help="hub id, short name, local HF folder or .pth")
    g.add_argument(
        "--input",
        "-i",
        required=True,
        help="a folder of images (recursive), a .csv/.jsonl manifest, or WebDataset .tar shards "
        "(paths, globs or brace patterns like 'data/web-{000000..000009}.tar')",
    )
    g.add_argument("--out", "-o", required=True, help="output folder (rerun the same command to resume)")
    g.add_argument("--format", choices=OUTPUT_FORMATS, default="jsonl", help="result shards (default: jsonl)")
    g.add_argument("--overwrite", action="store_true", help="discard earlier results in --out and start over")
    g.add_argument("--tokenizer", help="tokenizer folder or vocab.txt, for checkpoints that ship none")
    g.add_argument("--shard-size", type=int, default=1000, help="rows per output shard (default: 1000)")
    g.add_argument("--limit", type=int, help="only the first N rows of the input")

    g = p.add_argument_group("speed")
    add_device_flag(g)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights/compute dtype (default fp32)")
    g.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default: 16)")
    g.add_argument(
        "--workers",
        type=int,
        help="image-decoding processes (default: on a GPU one per CPU core but two, up to 16; on a CPU none below 8 "
        "cores); 0: decode in threads of the job's own process",
    )
    g.add_argument("--prefetch", type=int, default=4, help="batches decoded ahead of the model (default: 4)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")

    g = p.add_argument_group("input")
    g.add_argument("--input-type", choices=INPUT_KINDS, default="auto", help="what --input is (default: by its name)")
    g.add_argument("--image-column", help="manifest column with the image path or URL (default: image, path, url, ...)")
    g.add_argument(
        "--id-column", help='manifest column with the row id written as "image" (default: id, else the path)'
    )
    g.add_argument("--text-column", help="manifest column with the text (default: text or caption)")
    g.add_argument("--question-column", help="manifest column with the question (default: question)")
    g.add_argument("--root", help="folder that relative manifest paths start from (default: the manifest's folder)")
    g.add_argument(
        "--extensions",
        default=",".join(IMAGE_EXTENSIONS),
        help="folder inputs: file extensions taken as images, comma-separated, or '*' for every file",
    )

    add_engine_flags(p.add_argument_group("engine"))
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens")


def add_engine_flags(g: Any) -> None:
    """The engine's flags (`EngineOptions`), for every job command (`blip batch`, `blip capfilt`)."""
    g.add_argument("--engine", choices=ENGINES, default="auto", help="auto: torchrun when launched by it, else local")
    g.add_argument("--ray-address", help="Ray cluster to join ('auto' or host:port; default: start a local one)")
    g.add_argument("--num-workers", type=int, help="Ray actors (default: one per GPU, else per --cpus-per-worker)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per Ray actor")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray actor (default: 1 when the cluster has GPUs)")
    g.add_argument(
        "--dist-timeout",
        type=float,
        dest="dist_timeout_s",
        default=EngineOptions().dist_timeout_s,
        metavar="SECONDS",
        help="torchrun: how long ranks wait for each other, e.g. for the slowest rank's share (default: 24 h)",
    )


def disk_error(e: OSError, out: str) -> str:
    """One line for an OS error while a job runs: a full disk under the output folder (a rerun resumes), or what
    the OS said about which file."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device of {Path(out).expanduser().resolve()} (disk or quota full): free some "
            f"space, then rerun the same command; it resumes where it stopped"
        )
    what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    return f"{what} (finished shards are kept: a rerun resumes)"


def build_batch_parser(prog: str = "blip batch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a task over every image of a folder, manifest or WebDataset: results go to atomic shards "
        "in --out with a _manifest.json and errors.jsonl; rerunning the same command resumes. Scale out with "
        "`torchrun --nproc_per_node N -m blip.jobs batch ...` or --engine ray.",
    )
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    p = sub.add_parser("caption", help="caption every image", description="Caption every image.")
    _common(p)
    add_option_flags(p.add_argument_group("generation"), CaptionOptions)

    p = sub.add_parser(
        "vqa",
        help="answer questions about every image",
        description="Answer a question per row (the manifest's question column), or ask every --question about "
        "every image.",
    )
    _common(p)
    p.add_argument("--question", action="append", help="ask this about every image (repeatable)")
    add_option_flags(p.add_argument_group("answering"), VqaOptions)

    p = sub.add_parser(
        "match",
        help="image-text matching probability of every row",
        description="ITM probability for each row's image and text (the manifest's text column), or for every "
        "image with each --text.",
    )
    _common(p)
    p.add_argument("--text", action="append", help="pair every image with this text (repeatable)")

    p = sub.add_parser(
        "reason",
        help="NLVR2: is each row's statement about its image pair true?",
        description="P(true) of each row's statement about its two images, from an NLVR2 model. The input is a "
        "CSV/JSONL manifest with the columns image_a, image_b (paths or http(s) URLs) and statement (NLVR2's "
        "`sentence` is read too); --text-column names another statement column.",
    )
    _common(p)

    p = sub.add_parser(
        "embed",
        help="ITC image embeddings and a search index",
        description="L2-normalised ITC embeddings of every image (.npy or .safetensors shards, row i of the vectors "
        "= line i of the rows; [rows, dim], or [rows, Q, dim] for BLIP-2: one feature per query token), then a "
        "search index for `blip retrieve`.",
    )
    _common(p)
    p.add_argument("--embed-format", choices=EMBED_FORMATS, default="npy", help="vector shards (default: npy)")
    p.add_argument(
        "--index",
        dest="index_type",
        choices=INDEX_KINDS,
        default="auto",
        help="search index: flat (exact), ivf, hnsw (faiss), none, or auto (flat up to 100k images)",
    )
    video = p.add_argument_group("video (needs pip install 'blip-vl[video]')")
    video.add_argument(
        "--media",
        choices=MEDIA,
        default="auto",
        help="what --input holds: auto (videos when a folder has no images but video files, or every manifest path "
        "is a video), image or video",
    )
    video.add_argument(
        "--frames",
        dest="num_frames",
        type=int,
        default=8,
        help="frames sampled uniformly per video; its embedding is their mean projected [CLS] (default: 8)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    task = args.task
    questions = tuple(getattr(args, "question", None) or ())
    texts = tuple(getattr(args, "text", None) or ())
    if any(not q.strip() for q in questions):
        raise _UsageError("a --question is empty")
    if any(not t.strip() for t in texts):
        raise _UsageError("a --text is empty")
    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
    inputs = InputOptions(
        kind=args.input_type,
        image_column=args.image_column,
        id_column=args.id_column,
        text_column=args.text_column,
        question_column=args.question_column,
        root=args.root,
        extensions=extensions,
        questions=questions,
        texts=texts,
        limit=args.limit,
    )
    options = TaskOptions(**option_values(args, OPTIONS[task])) if task in OPTIONS else TaskOptions()
    return BatchConfig(
        task=task,
        model=args.model,
        input=args.input,
        out=args.out,
        tokenizer=args.tokenizer,
        output_format=args.format,
        embed_format=getattr(args, "embed_format", "npy"),
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=args.workers,
        prefetch=args.prefetch,
        overwrite=args.overwrite,
        progress=args.progress,
        index_type=getattr(args, "index_type", "auto"),
        inputs=inputs,
        options=options,
        engine=EngineOptions.of(args),
        media=getattr(args, "media", "auto"),
        num_frames=getattr(args, "num_frames", 8),
    )


def fatal(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def setup_logging(verbose: bool) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    elif verbose:
        logging.getLogger().setLevel(logging.INFO)


def batch_main(argv: list[str] | None = None, prog: str = "blip batch") -> int:
    """`blip batch caption|vqa|match|embed ...`; returns the exit code."""
    from blip.weights.load import CheckpointError

    parser = build_batch_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = config_from_args(args)
        result = run_batch(cfg)
    except (_UsageError, InputError, OutputError, CheckpointError, JobError, FileNotFoundError, ValueError) as e:
        return fatal(f"{prog} {args.task}", str(e))
    except OSError as e:  # a full disk, a read-only folder: finished shards are kept
        return fatal(f"{prog} {args.task}", disk_error(e, args.out))
    except (OutputBusyError, RuntimeError) as e:  # another job on --out; an optional package that is missing
        return fatal(f"{prog} {args.task}", str(e))
    except KeyboardInterrupt:
        print(f"{prog} {args.task}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    s = result.summary
    if not result.primary:
        return result.exit_code
    verb = "resumed" if result.resumed else "ran"
    print(
        f"{prog} {args.task}: {verb} on {result.engine} in {result.seconds:.1f}s: {s.rows} rows, {s.rows_ok} ok, "
        f"{s.rows_failed} failed -> {result.out}",
        file=sys.stderr,
    )
    if s.rows_failed:
        print(f"{prog} {args.task}: failed rows and reasons are in {result.out / 'errors.jsonl'}", file=sys.stderr)
    if result.index:
        print(
            f"{prog} {args.task}: index {result.index['backend']}/{result.index['kind']} over "
            f"{result.index['count']} {result.index.get('media', 'image')}s in {result.out / 'index'}",
            file=sys.stderr,
        )
    return result.exit_code


# ---------------------------------------------------------------------------------------------------------------------
# blip retrieve


def build_retrieve_parser(prog: str = "blip retrieve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Search an image collection embedded by `blip batch embed`: top-k by ITC (cosine), re-ranked "
        'by ITM, with both scores. Example: blip retrieve --index out/ "a dog on a beach"',
    )
    p.add_argument("queries", nargs="*", help="text queries")
    p.add_argument("--index", required=True, help="the `blip batch embed` output folder (or its index/ folder)")
    p.add_argument("--model", "-m", help="the checkpoint that made the embeddings (default: the one recorded)")
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt, for checkpoints that ship none")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="an image query (repeatable): similar images by ITC (BLIP indexes only)",
    )
    p.add_argument("--top-k", type=int, default=10, help="results per query (default: 10)")
    p.add_argument("--no-rerank", action="store_true", help="text queries: ITC order only, no ITM re-ranking")
    p.add_argument("--nprobe", type=int, help="ivf: cells searched per query")
    p.add_argument("--ef-search", type=int, help="hnsw: search breadth")
    add_device_flag(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--format", choices=["text", "jsonl"], default="text", help="output format (default: text)")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def retrieve_main(argv: list[str] | None = None, prog: str = "blip retrieve") -> int:
    """`blip retrieve --index DIR "query" ... [--image q.jpg]`; returns the exit code."""
    import blip
    from blip.jobs.sources import fetch_url
    from blip.tasks.retrieval import SearchIndexError, load_collection_index, search_images, search_texts
    from blip.transforms import ImageDecodeError
    from blip.weights.fingerprint import model_fingerprint
    from blip.weights.load import CheckpointError

    parser = build_retrieve_parser(prog)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not args.queries and not args.image:
        return fatal(prog, "give a text query, or --image")
    if any(not q.strip() for q in args.queries):
        return fatal(prog, "a query is empty")
    for flag, value in (("--top-k", args.top_k), ("--nprobe", args.nprobe), ("--ef-search", args.ef_search)):
        if value is not None and value < 1:
            return fatal(prog, f"{flag} must be >= 1, got {value}")
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        return fatal(prog, str(e))
    try:
        collection = load_collection_index(args.index, nprobe=args.nprobe, ef_search=args.ef_search, fetch=fetch_url)
        if args.image:
            collection.check_image_queries()  # before any model loads
        model_source = args.model or collection.meta.get("model_source")
        if not model_source:
            raise SearchIndexError("the index does not record its model: pass --model")
        recorded = (collection.meta.get("model") or {}).get("sha256")
        if recorded and model_fingerprint(model_source, args.tokenizer)["sha256"] != recorded:
            raise SearchIndexError(
                f"{model_source} is not the checkpoint that embedded this collection "
                f"({collection.meta.get('model_source')}); its ITC space would not match"
            )
        model = blip.load(model_source, device=device, dtype=args.dtype, tokenizer=args.tokenizer)
        started = time.perf_counter()
        results: list[tuple[str, list[Any]]] = []
        if args.queries:
            hits = search_texts(model, collection, args.queries, top_k=args.top_k, rerank=not args.no_rerank)
            results += list(zip(args.queries, hits))
        if args.image:
            hits = search_images(model, collection, args.image, top_k=args.top_k)
            results += list(zip(args.image, hits))
        elapsed = time.perf_counter() - started
    except (SearchIndexError, CheckpointError, ImageDecodeError, FileNotFoundError, ValueError, RuntimeError) as e:
        return fatal(prog, str(e))
    for query, hits in results:
        if args.format == "jsonl":
            for hit in hits:
                row = {"query": query, "rank": hit.rank, "image": hit.image, "itc": hit.itc, "itm": hit.itm}
                print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"# {query}")
            for hit in hits:
                itm = "" if hit.itm is None else f"\titm={hit.itm:.4f}"
                print(f"{hit.rank}\t{hit.image}\titc={hit.itc:.4f}{itm}")
    info = collection.index.info
    print(
        f"{prog}: {len(results)} queries in {elapsed * 1000:.1f} ms ({info.backend}/{info.kind} index, "
        f"{len(collection.rows)} {collection.media}s)",
        file=sys.stderr,
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m blip.jobs batch ...` / `python -m blip.jobs retrieve ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "batch":
        return batch_main(argv[1:])
    if argv and argv[0] == "retrieve":
        return retrieve_main(argv[1:])
    print("usage: python -m blip.jobs batch|retrieve ...", file=sys.stderr)
    return EXIT_USAGE
