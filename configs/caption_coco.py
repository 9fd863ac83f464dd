"""Fine-tune BLIP ViT-B on COCO captions (Karpathy train split), as in the paper.

    torchrun --nproc_per_node 8 -m blip.cli train --config configs/caption_coco.py \\
        data=coco/dataset_coco.json image_root=coco/images init=model_base_capfilt_large.pth
    blip eval --model runs/caption_coco/model --task caption --data coco/dataset_coco.json --split test

Paper (Karpathy test, beam 3, 5..20 tokens, prompt "a picture of "): ViT-B 14M B@4 38.6 / CIDEr 129.7;
129M 39.4 / 131.4; CapFilt-L 39.7 / 133.3; ViT-L 40.4 / 136.7 (LAVIS re-run of base: 39.9 / 133.5). Recipe
(docs/training.md): lr 1e-5 cosine to 0 without warmup, 5 epochs, 32 per GPU x 8, 384 px, AdamW wd 0.05. The original
trained in fp32; bf16 autocast is used on GPUs here (amp=none to match).
"""

from blip.train.config import TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="caption",
        data="coco/dataset_coco.json",
        data_split="train",
        image_root="coco/images",
        init="model_base_capfilt_large.pth",
        vocab="bert-base-uncased",
        out_dir="runs/caption_coco",
        eval_data="coco/dataset_coco.json",
        image_size=384,
        prompt="a picture of ",
        epochs=5,
        batch_size=32,
        lr=1e-5,
        warmup_steps=0,
        weight_decay=0.05,
        crop_scale=(0.5, 1.0),
        num_workers=8,
        log_every=50,
        ckpt_every=2000,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/caption_coco",
            max_steps=10,
            batch_size=2,
            max_samples=64,
            num_workers=0,
            eval_max_images=8,
            log_every=1,
        )
    return cfg
