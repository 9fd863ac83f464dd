"""Fine-tune the pretrained shapes model for image-text retrieval (ITC with same-image positives + ITM).

    blip train --config configs/pretrain_shapes.py                      # first, once
    blip train --config configs/retrieval_shapes.py
    blip eval --model runs/retrieval_shapes/model --task retrieval --data runs/shapes
    blip train --config configs/retrieval_shapes.py smoke=true    # from scratch, a few steps

Test: ITC similarities for all pairs, the top 16 of each query re-scored with ITM (BLIP's k_test). Measured (1 CPU
thread, 3.5 min, 936 steps, 200 test images / 1000 captions): TR@1/5/10 57.5/93.0/98.5, IR@1/5/10 51.0/94.2/99.2
(ITC alone: TR@1 63.0, IR@1 50.2). Chance R@1: 0.5; untrained: TR@1 0.0, IR@1 0.6.
"""

from blip.train.config import TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="retrieval",
        data="runs/shapes",
        data_split="clean",
        make_shapes=True,
        init="runs/pretrain_shapes/checkpoint.pt",
        out_dir="runs/retrieval_shapes",
        eval_data="runs/shapes",
        eval_max_images=200,
        max_text_len=35,
        image_size=64,
        patch_size=8,
        vision_width=128,
        vision_layers=3,
        vision_heads=4,
        text_width=128,
        text_layers=2,
        text_heads=4,
        embed_dim=64,
        init_std=0.1,
        queue_size=2048,
        alpha_ramp_epochs=1.0,  # retrieval fine-tuning ramps alpha over the first epoch (FACTS.md 7)
        epochs=3,
        batch_size=32,
        lr=2e-4,
        augment=False,
        hflip=False,
        randaugment=False,
        log_every=25,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/retrieval_shapes",
            init="",  # from scratch: a smoke run needs no pretraining
            shapes_counts=(32, 64, 32, 8),
            data="runs/smoke/shapes",
            eval_data="runs/smoke/shapes",
            image_size=32,
            vision_width=64,
            vision_layers=2,
            text_width=64,
            embed_dim=32,
            batch_size=8,
            max_steps=6,
            queue_size=32,
            log_every=2,
            eval_max_images=8,
        )
    return cfg
