"""Fine-tune the pretrained shapes model into a captioner (LM with the prompt "a picture of ") on the clean split.

    blip train --config configs/pretrain_shapes.py                      # first, once
    blip train --config configs/caption_shapes.py
    blip eval --model runs/caption_shapes/model --task caption --data runs/shapes
    blip train --config configs/caption_shapes.py smoke=true      # from scratch, a few steps

Writes runs/caption_shapes/model (Hugging Face layout: `blip.load(...)` and transformers read it) and test metrics
(beam 3, at most 20 new tokens, 200 test images). Measured (1 CPU thread, 2.2 min, 936 steps): CIDEr 213.2,
B@4 53.4, ROUGE-L 68.7; the same architecture untrained: CIDEr 0.8; trained from scratch (init=): ~188.
"""

from blip.train.config import SHAPES_MODEL, SHAPES_SMOKE, TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="caption",
        data="runs/shapes",
        data_split="clean",
        make_shapes=True,
        init="runs/pretrain_shapes/checkpoint.pt",
        out_dir="runs/caption_shapes",
        eval_data="runs/shapes",
        eval_max_images=200,
        eval_min_new_tokens=0,
        prompt="a picture of ",
        **SHAPES_MODEL,
        epochs=3,
        batch_size=32,
        lr=2e-4,
        min_lr=0.0,
        log_every=25,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/caption_shapes",
            init="",  # from scratch: a smoke run needs no pretraining
            **SHAPES_SMOKE,
            eval_num_beams=1,
        )
    return cfg
