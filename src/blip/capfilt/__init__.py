"""CapFilt (the paper's §3.3): caption every web image with a fine-tuned captioner, filter the web and synthetic
texts with a fine-tuned ITM filter, and write the bootstrapped dataset a new model is pre-trained on.

- `core`: `run_capfilt` (resumable, sharded: a job kind, `CapfiltKind`, on the `blip.jobs` engines), `CapfiltConfig`,
  `CapfiltSummary`
- `calibrate`: `choose_threshold` (the filter's threshold from validation scores), `score_validation`,
  `choose_itc_weight` and `filter_score` (the ITC head's share of the filter's score)
- `cli`: `capfilt_main` (`blip capfilt ...`)
"""

from blip.capfilt.calibrate import ValidationScores, choose_itc_weight, choose_threshold, filter_score, score_validation
from blip.capfilt.core import (
    DATASET,
    RECORDS_PREFIX,
    SUMMARY,
    CapfiltConfig,
    CapfiltSummary,
    read_records,
    row_seed,
    run_capfilt,
)

__all__ = [
    "DATASET",
    "RECORDS_PREFIX",
    "SUMMARY",
    "CapfiltConfig",
    "CapfiltSummary",
    "ValidationScores",
    "choose_itc_weight",
    "choose_threshold",
    "filter_score",
    "read_records",
    "row_seed",
    "run_capfilt",
    "score_validation",
]
