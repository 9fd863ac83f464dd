"""Fine-tune BLIP ViT-B for VQAv2 (train + val + Visual Genome QA), as in the paper.

    torchrun --nproc_per_node 16 -m blip.cli train --config configs/vqa_coco.py \\
        data=vqa/vqa_train.json,vqa/vqa_val.json,vqa/vg_qa.json image_root=images init=model_base_capfilt_large.pth
    blip eval --model runs/vqa_coco/model --task vqa --data vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json \\
        --vqa-mode rank

Paper (test-dev / test-std): ViT-B 14M 77.54 / 77.62; 129M 78.24 / 78.17; CapFilt-L 78.25 / 78.32 (LAVIS re-run
78.23 / 78.29). Recipe (docs/training.md): lr 2e-5 cosine, 10 epochs, 16 per GPU x 16, 480 px, stochastic depth 0.1,
answers weighted by their share of the 10 votes, rank mode over the 3,128-answer list at test time. Difference:
Visual Genome rows (one answer) get weight 1 here, 0.2 in the original.
"""

from blip.train.config import TrainConfig


def get_config(smoke: bool = False) -> TrainConfig:
    cfg = TrainConfig(
        task="vqa",
        data="vqa/vqa_train.json,vqa/vqa_val.json,vqa/vg_qa.json",
        image_root="images",
        init="model_base_capfilt_large.pth",
        vocab="bert-base-uncased",
        out_dir="runs/vqa_coco",
        image_size=480,
        max_text_len=35,
        drop_path=0.1,
        epochs=10,
        batch_size=16,
        lr=2e-5,
        crop_scale=(0.5, 1.0),
        eval_vqa_mode="rank",
        num_workers=8,
        log_every=50,
        ckpt_every=2000,
    )
    if smoke:
        cfg = cfg.replace(
            out_dir="runs/smoke/vqa_coco", max_steps=10, batch_size=2, max_samples=64, num_workers=0, log_every=1
        )
    return cfg
