"""The one error type every checkpoint problem is reported as (the CLIs map it to exit code 2 and one line)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or matched to the model; the message names the file or keys."""
