"""`blip demo` / `make demo`: the paper's CapFilt story on the shapes world (`stages.py`) and its report
(`report.py`)."""

from blip.demo.stages import (
    DemoConfig,
    DemoConfigError,
    analyse_capfilt,
    finetune,
    generate_world,
    load_demo_config,
    pick_examples,
    pretrain,
    pretraining_clean,
    run_capfilt_stage,
    run_demo,
    summary_text,
)

__all__ = [
    "DemoConfig",
    "DemoConfigError",
    "analyse_capfilt",
    "finetune",
    "generate_world",
    "load_demo_config",
    "pick_examples",
    "pretrain",
    "pretraining_clean",
    "run_capfilt_stage",
    "run_demo",
    "summary_text",
]
