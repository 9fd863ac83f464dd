"""NLVR2 fine-tuning of BLIP-base as the paper and the original `configs/nlvr.yaml` do it.

    blip train --config configs/nlvr_base.py data=/data/nlvr2 image_root=/data/nlvr2/images
    torchrun --nproc_per_node 8 -m blip.cli train --config configs/nlvr_base.py data=... batch_size=32

Data: NLVR2's annotation files as BLIP ships them (`nlvr_train.json`, `nlvr_dev.json`, `nlvr_test.json`: records
{"images": [left, right], "sentence", "label": "True"/"False"}) in `data`, images under `image_root`. Init: a pretrained
BLIP (`model_base.pth`, 129M images in the paper; any pretrain/retrieval checkpoint works): its cross-attention is
copied into both image branches, merge layers and classifier start fresh. Settings (the original configs/nlvr.yaml): 384
px, AdamW lr 3e-5, weight decay 0.05, cosine over 15 epochs, batch 16 per GPU x 16 GPUs (= 256), ViT drop_path 0.1,
statements cut to 40 words, pair-swap + left/right augmentation. The paper reports 82.48 dev / 83.25 test-P (Table 8).
"""

from blip.train.config import TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="nlvr",
        data="data/nlvr2",
        data_split="train",
        init="model_base.pth",
        vocab="bert-base-uncased",
        out_dir="runs/nlvr_base",
        eval_data="data/nlvr2",
        eval_split="dev",
        image_size=384,
        max_text_len=64,
        drop_path=0.1,
        epochs=15,
        batch_size=256,
        lr=3e-5,
        weight_decay=0.05,
        schedule="cosine",
        log_every=50,
    )
    if smoke:
        cfg = cfg.replace(max_steps=4, batch_size=2, eval_max_images=8, log_every=1)
    return cfg
