"""`blip train` and `blip eval`.

    blip train --config configs/caption_shapes.py [key=value ...]
    torchrun --nproc_per_node 2 -m blip.cli train --config configs/pretrain_shapes.py
    blip eval --model runs/caption_shapes/model --task caption --data runs/shapes [--out DIR]

`cli_main(argv)` / `eval_main(argv)` take the arguments after the subcommand and return the exit code: 0 ok,
1 the run stopped early (stop_after) or failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from blip.devices import DeviceError, add_device_flag, resolve_device
from blip.distributed import world_info_from_env
from blip.train.config import ConfigError, TrainConfig, resolve_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_logger = logging.getLogger(__name__)


def _setup_logging(verbose: bool) -> None:
    rank = world_info_from_env()[0]
    level = logging.INFO if (verbose or rank == 0) else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    else:
        root.setLevel(min(root.level, level) if root.level else level)
    logging.getLogger("blip").setLevel(level)


def train_parser() -> argparse.ArgumentParser:
    fields = ", ".join(f.name for f in TrainConfig.__dataclass_fields__.values())
    parser = argparse.ArgumentParser(
        prog="blip train",
        description="Train or fine-tune BLIP (pretrain / caption / vqa / retrieval). Launch under "
        "`torchrun --nproc_per_node N` for several processes. A run resumes from out_dir/checkpoint.pt.",
        epilog=f"config keys: {fields}",
    )
    parser.add_argument("--config", "-c", help="config file (Python, defines get_config(smoke=False))")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--verbose", "-v", action="store_true", help="log on every rank")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields (typed)")
    return parser


def cli_main(argv: list[str] | None = None) -> int:
    """`blip train --config FILE key=value ...`."""
    parser = train_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"blip train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return EXIT_OK
    if not cfg.data:
        print("blip train: error: no training data: set data=<folder or manifest> (or use a config)", file=sys.stderr)
        return EXIT_USAGE
    try:
        resolve_device(cfg.device, world_info_from_env()[1])  # device=cuda without CUDA: one line, before any work
    except DeviceError as e:
        print(f"blip train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.verbose)
    from blip.data.manifests import DataError
    from blip.train.modeling import ModelInitError
    from blip.train.recipe import run
    from blip.weights.load import CheckpointError

    try:
        summary = run(cfg)
    except (DataError, ModelInitError, CheckpointError, FileNotFoundError) as e:
        print(f"blip train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if world_info_from_env()[0] == 0:
        print(json.dumps(summary.to_dict(), indent=2))
    return EXIT_OK if summary.finished else EXIT_FAILED


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip eval",
        description="Evaluate a model on a test split: caption (BLEU/CIDEr/ROUGE-L), vqa (accuracy), retrieval (R@K). "
        "Prints the metrics as JSON and writes them, the predictions and PNG plots to --out.",
    )
    parser.add_argument("--model", "-m", required=True, help="training checkpoint (.pt), HF folder, .pth or hub id")
    parser.add_argument("--task", required=True, choices=list(EVAL_HEADS))
    parser.add_argument("--data", required=True, help="dataset folder (test.jsonl, vqa_test.jsonl, ...) or test file")
    parser.add_argument("--split", default="test", help="split of a Karpathy file (default: test)")
    parser.add_argument("--out", help="folder for metrics, predictions and plots (default: next to the model)")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0 = all)")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder or vocab.txt, for checkpoints that ship none")
    parser.add_argument("--prompt", default=None, help="caption prompt (default: the checkpoint's training prompt)")
    parser.add_argument("--num-beams", type=int, default=None, help="beams (default: caption 3, vqa 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--min-new-tokens", type=int, default=5)
    parser.add_argument("--vqa-mode", choices=["generate", "rank"], default="generate")
    parser.add_argument("--k-test", type=int, default=16, help="retrieval: candidates re-ranked with ITM")
    parser.add_argument(
        "--frames", type=int, default=8, help="video_retrieval: frames sampled per clip (--data: a clip manifest)"
    )
    add_device_flag(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser


def _default_prompt(model: str) -> str:
    """The prompt a caption checkpoint was fine-tuned with: from its training checkpoint or its run's config."""
    from blip.weights.checkpoint import is_training_checkpoint, load_checkpoint

    path = Path(model)
    if is_training_checkpoint(path):
        train = load_checkpoint(path).get("train_config", {})
        return train.get("prompt", "") if train.get("task") == "caption" else ""
    run_config = path.parent / "config.json"  # a run's model/ folder sits next to the run's config.json
    if path.is_dir() and run_config.is_file():
        data = json.loads(run_config.read_text())
        if data.get("task") == "caption":
            return data.get("prompt", "")
    return ""


EVAL_HEADS = {"caption": "caption", "vqa": "vqa", "retrieval": "itm", "video_retrieval": "itm", "nlvr": "reason"}


def eval_main(argv: list[str] | None = None) -> int:
    """`blip eval --model M --task caption|vqa|retrieval|video_retrieval|nlvr --data DIR`."""
    args = eval_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from blip.api import load

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        print(f"blip eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from blip.evaluation.run import evaluate, write_result
    from blip.weights.load import CheckpointError

    kind = "vqa" if args.task == "vqa" else None  # only a VQA checkpoint needs its kind named
    try:
        blip_model = load(
            args.model, device=str(device), tokenizer=args.tokenizer or None, batch_size=args.batch_size, kind=kind
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"blip eval: error: cannot load {args.model}: {e}", file=sys.stderr)
        return EXIT_USAGE
    needs = EVAL_HEADS[args.task]
    if needs not in blip_model.tasks:
        print(
            f"blip eval: error: a {blip_model.config.kind!r} model cannot be evaluated on {args.task}", file=sys.stderr
        )
        return EXIT_USAGE
    prompt = args.prompt if args.prompt is not None else _default_prompt(args.model)
    try:
        result = evaluate(
            blip_model,
            args.task,
            args.data,
            split=args.split,
            max_images=args.max_images,
            prompt=prompt,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            vqa_mode=args.vqa_mode,
            k_test=args.k_test,
            num_frames=args.frames,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"blip eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    model_path = Path(args.model)
    out = Path(args.out) if args.out else (model_path if model_path.is_dir() else model_path.parent) / "eval"
    write_result(result, out, plots=not args.no_plots)
    print(json.dumps({"task": args.task, "model": args.model, "metrics": result.metrics}, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(cli_main())
