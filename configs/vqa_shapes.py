"""Fine-tune the pretrained shapes model for VQA (answer generation, answers weighted by their votes).

    blip train --config configs/pretrain_shapes.py                      # first, once
    blip train --config configs/vqa_shapes.py
    blip eval --model runs/vqa_shapes/model --task vqa --data runs/shapes [--vqa-mode rank]
    blip train --config configs/vqa_shapes.py smoke=true          # from scratch, a few steps

The VQA model takes the pretrained image-grounded encoder as its question encoder and the pretrained decoder as
its answer decoder. Measured (1 CPU thread, 3.6 min, 1560 steps, 200 test images / 1000 questions): accuracy 73.4
(yes/no 81.9, number 100.0, other 66.5). Untrained: 0; blind baseline (each question's most common training answer,
no image): 46.7; trained from scratch (init=, 3 epochs): ~58.6.
"""

from blip.train.config import SHAPES_MODEL, SHAPES_SMOKE, TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="vqa",
        data="runs/shapes",
        data_split="vqa",
        make_shapes=True,
        init="runs/pretrain_shapes/checkpoint.pt",
        out_dir="runs/vqa_shapes",
        eval_data="runs/shapes",
        eval_max_images=200,
        max_text_len=35,
        **SHAPES_MODEL,
        epochs=5,
        batch_size=32,
        lr=2e-4,
        log_every=25,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/vqa_shapes",
            init="",  # from scratch: a smoke run needs no pretraining
            **SHAPES_SMOKE,
        )
    return cfg
