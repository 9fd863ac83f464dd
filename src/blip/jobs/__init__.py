"""Batch jobs at collection scale: `blip batch caption|vqa|match|embed` (resumable, sharded, on one process, torchrun
ranks or Ray actors) and `blip retrieve` over an embedded collection.

- `sources`: folder / CSV / JSONL / WebDataset inputs -> a fixed list of rows
- `prefetch`: image decoding in threads, ahead of the model
- `runner`: rows through `blip.tasks.batch.dispatch`; shards worked through with a journal per batch
- `writer`: the output folder: atomic shards, receipts, `_manifest.json`, `errors.jsonl`
- `engines`: local, torchrun and Ray
- `index`: building the flat / IVF / HNSW search index (faiss or numpy); searching it is `blip.tasks.retrieval`
- `cli`: `batch_main` and `retrieve_main`
"""

from blip.jobs.batch import BatchConfig, BatchResult, EngineOptions, run_batch
from blip.jobs.index import build_collection_index, build_index
from blip.jobs.runner import TaskOptions
from blip.jobs.sources import InputOptions, Row, plan_input
from blip.tasks.retrieval import load_collection_index, search_images, search_texts

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
