"""Batch jobs at collection scale: `blip batch caption|vqa|match|embed` (resumable, sharded, on one process, torchrun
ranks or Ray actors) and `blip retrieve` over an embedded collection.

- `sources`: folder / CSV / JSONL / WebDataset inputs -> a fixed list of rows
- `pipeline`: image decoding in threads, ahead of the model
- `runner`: the `blip.tasks` functions on a batch; shards worked through with a journal per batch
- `writer`: the output folder: atomic shards, receipts, `_manifest.json`, `errors.jsonl`
- `engines`: local, torchrun and Ray
- `index`: flat / IVF / HNSW search (faiss or numpy) and ITC search + ITM re-ranking
- `cli`: `batch_main` and `retrieve_main`
"""

from blip.jobs.batch import BatchConfig, BatchResult, EngineOptions, run_batch
from blip.jobs.index import build_collection_index, build_index, load_collection_index, search_images, search_texts
from blip.jobs.runner import TaskOptions
from blip.jobs.sources import InputOptions, Row, plan_input

__all__ = [
    "BatchConfig",
    "BatchResult",
    "EngineOptions",
    "InputOptions",
    "Row",
    "TaskOptions",
    "build_collection_index",
    "build_index",
    "load_collection_index",
    "plan_input",
    "run_batch",
    "search_images",
    "search_texts",
]
