"""Training: the losses live in `blip.losses`; this package holds the rest of a run.

- `config`: `TrainConfig`, config files as code, typed `key=value` overrides
- `recipe.run(cfg)`: a whole run (data, model, task, loop, export, evaluation); `cli.cli_main` / `cli.eval_main`
- `objectives`: `PretrainTask`, `CaptionTask`, `VqaTask`, `RetrievalTask` (`training_forward(batch) -> {..., "loss"}`)
- `loop.Trainer`: the generic loop (AMP, accumulation, clipping, DDP, checkpoints, exact resume)
- `datasets` / `collate`: datasets, the global batch sampler, WebDataset streaming (readers: `blip.data.manifests`,
  `blip.data.webdataset`)
- `optim`, `modeling` (build / export models), `plots` (training curves); process group and gathers:
  `blip.distributed`; running a model over a test set: `blip.evaluation.run`

Nothing here is imported by `blip.models` or the inference API.
"""
