"""Fine-tune BLIP ViT-B for COCO image-text retrieval (Karpathy splits), as in the paper.

    torchrun --nproc_per_node 8 -m blip.cli train --config configs/retrieval_coco.py \\
        data=coco/dataset_coco.json image_root=coco/images init=model_base_capfilt_large.pth
    blip eval --model runs/retrieval_coco/model --task retrieval --data coco/dataset_coco.json --k-test 256

Paper (COCO 5k test, TR@1/5/10 and IR@1/5/10): ViT-B 14M 80.6/95.2/97.6 and 63.1/85.3/91.1; 129M
81.9/95.4/97.8 and 64.3/85.7/91.5; CapFilt-L 81.2/95.7/97.9 and 64.1/85.8/91.6; ViT-L 82.4/95.4/97.9 and
65.1/86.3/91.8. Recipe (docs/training.md): lr 1e-5 cosine, 6 epochs, 32 per GPU x 8, 384 px, queue 57600, alpha 0.4
ramped over the first epoch, hard negatives from all ranks, k_test 256 at evaluation.
"""

from blip.train.config import TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="retrieval",
        data="coco/dataset_coco.json",
        data_split="train",
        image_root="coco/images",
        init="model_base_capfilt_large.pth",
        vocab="bert-base-uncased",
        out_dir="runs/retrieval_coco",
        eval_data="coco/dataset_coco.json",
        eval_k_test=256,
        image_size=384,
        max_text_len=35,
        queue_size=57600,
        alpha=0.4,
        alpha_ramp_epochs=1.0,
        negatives_all_ranks=True,
        epochs=6,
        batch_size=32,
        lr=1e-5,
        crop_scale=(0.5, 1.0),
        grad_checkpointing=True,
        num_workers=8,
        log_every=50,
        ckpt_every=2000,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/retrieval_coco",
            max_steps=10,
            batch_size=2,
            max_samples=64,
            queue_size=64,
            num_workers=0,
            eval_max_images=8,
            log_every=1,
        )
    return cfg
