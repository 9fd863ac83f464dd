"""Pretrain BLIP ViT-B on the 14M-image corpus (COCO + VG + SBU + CC3M + CC12M), as in the paper.

    torchrun --nnodes 2 --nproc_per_node 8 -m blip.cli train --config configs/pretrain_coco.py \\
        data=coco_karpathy_train.json,vg_caption.json,"cc3m/{00000..00331}.tar" ...

The data spec lists manifests (.json/.jsonl/.csv) and/or WebDataset shards (one kind per run here: convert the
others first). Recipe (docs/training.md): 20 epochs, lr 3e-4 with 3000 warmup steps from 1e-6 (the original then decays
x0.9 per epoch; cosine to 1e-6 here), AdamW wd 0.05, 224 px, crop scale 0.2, queue 57600, momentum 0.995,
alpha 0.4 ramped over 2 epochs, ITC + ITM + LM 1:1:1, text max length 30, global batch 2880. The model starts from an
ImageNet ViT-B/16 and BERT-base in the paper; `init=` a converted checkpoint to do the same.
Downstream numbers of the resulting model: see caption_coco.py, retrieval_coco.py, vqa_coco.py.
"""

from blip.train.config import TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="pretrain",
        data="coco/coco_karpathy_train.json",
        image_root="images",
        preset="blip_base_pretrain",
        vocab="bert-base-uncased",
        out_dir="runs/pretrain_coco",
        image_size=224,
        max_text_len=30,
        queue_size=57600,
        alpha_ramp_epochs=2.0,
        epochs=20,
        batch_size=75,
        lr=3e-4,
        warmup_steps=3000,
        warmup_lr=1e-6,
        min_lr=1e-6,
        crop_scale=(0.2, 1.0),
        num_workers=8,
        log_every=50,
        ckpt_every=2000,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/pretrain_coco",
            max_steps=10,
            batch_size=2,
            max_samples=64,
            queue_size=64,
            warmup_steps=2,
            num_workers=0,
            log_every=1,
        )
    return cfg
