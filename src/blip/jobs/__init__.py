"""Batch jobs at collection scale: `blip batch caption|vqa|match|embed` (resumable, sharded, on one process, torchrun
ranks or Ray actors), `blip retrieve` over an embedded collection, and the machinery CapFilt (`blip.capfilt`) runs on.

- `sources`: folder / CSV / JSONL / WebDataset inputs -> a fixed list of rows
- `prefetch`: image decoding in worker processes (or threads), ahead of the model; pixels to the GPU one batch ahead
- `runner`: rows through `blip.tasks.batch.dispatch`; shards worked through with a journal per batch
- `writer`: the output folder: atomic shards, receipts, `_manifest.json` (which names all the job wrote), `errors.jsonl`
- `lock`: one job at a time per output folder
- `job`: `Job` and `JobKind`, the extension point: what a kind of job provides to the engines
- `engines`: local, torchrun and Ray, for any job
- `batch`: `blip batch` as a job kind (`BatchKind`, `run_batch`)
- `index`: building the flat / IVF / HNSW search index (faiss or numpy); searching it is `blip.tasks.retrieval`
- `cli`: `batch_main` and `retrieve_main`
"""

from blip.jobs.batch import BatchConfig, BatchKind, BatchResult, run_batch
from blip.jobs.index import build_collection_index, build_index
from blip.jobs.job import EngineOptions, Job, JobKind, RunSettings
from blip.jobs.runner import TaskOptions
from blip.jobs.sources import InputOptions, Row, plan_input
from blip.tasks.retrieval import load_collection_index, search_images, search_texts

__all__ = [
    "BatchConfig",
    "BatchKind",
    "BatchResult",
    "EngineOptions",
    "InputOptions",
    "Job",
    "JobKind",
    "Row",
    "RunSettings",
    "TaskOptions",
    "build_collection_index",
    "build_index",
    "load_collection_index",
    "plan_input",
    "run_batch",
    "search_images",
    "search_texts",
]
