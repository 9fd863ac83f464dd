"""Training objectives and models: every trainable parameter gets a gradient, VQA shares question states, text layers
are shared as in the paper, and pretrained parts export to caption / VQA / retrieval models."""

from __future__ import annotations

import pytest
import torch

from blip.config import get_preset
from blip.data.vocab import config_for, shapes_tokenizer
from blip.losses.lm import decoder_targets, token_losses
from blip.models.blip import BlipModel
from blip.models.init import init_weights
from blip.train.collate import PairCollator, QuestionCollator
from blip.train.modeling import tie_text_layers
from blip.train.objectives import CaptionTask, PretrainTask, RetrievalTask, VqaTask
from blip.weights.load import CheckpointError, model_for_kind

TOKENIZER = shapes_tokenizer()


def _model(kind: str, seed: int = 0) -> BlipModel:
    torch.manual_seed(seed)
    model = BlipModel(config_for(TOKENIZER, get_preset("blip_test", kind=kind)))
    init_weights(model)
    return model


def _pairs(n: int = 4) -> dict[str, torch.Tensor]:
    texts = ["a red circle", "a blue square on the left", "two shapes: a star and a circle", "a green diamond"]
    items = [{"pixel_values": torch.randn(3, 32, 32), "text": texts[i % 4], "image_id": i // 2} for i in range(n)]
    return PairCollator(TOKENIZER, 30)(items)


def _questions() -> dict[str, torch.Tensor]:
    items = [
        {
            "pixel_values": torch.randn(3, 32, 32),
            "question": "what color is the star?",
            "answers": ["red", "pink"],
            "weights": [0.7, 0.3],
        },
        {
            "pixel_values": torch.randn(3, 32, 32),
            "question": "how many shapes are there?",
            "answers": ["2"],
            "weights": [1.0],
        },
    ]
    return QuestionCollator(TOKENIZER)(items)


def _all_trainable_get_gradients(task) -> None:
    unused = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not unused, f"parameters without gradient (DDP would need find_unused_parameters): {unused[:5]}"


@pytest.mark.parametrize("share", [True, False])
def test_pretrain_task(share):
    model = _model("pretrain")
    if share:
        tie_text_layers(model)
    task = PretrainTask(model, queue_size=16, alpha_ramp_steps=10).train()
    task.before_step(5)
    assert task.itc.alpha == pytest.approx(0.2)
    out = task(_pairs())
    assert set(out) == {"itc_loss", "itm_loss", "lm_loss", "loss"}
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in ("itc_loss", "itm_loss", "lm_loss")))
    out["loss"].backward()
    _all_trainable_get_gradients(task)


def test_tied_text_layers_share_all_but_self_attention():
    model = _model("pretrain")
    tie_text_layers(model)
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    assert decoder.embeddings is encoder.embeddings
    for enc, dec in zip(encoder.layers, decoder.layers):
        assert dec.crossattention is enc.crossattention and dec.intermediate is enc.intermediate
        assert dec.output is enc.output and dec.attention is not enc.attention
    assert model.text_decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    untied = sum(p.numel() for p in _model("pretrain").parameters())
    assert sum(p.numel() for p in model.parameters()) < untied


def test_caption_task_ignores_the_prompt():
    model = _model("caption")
    batch = PairCollator(TOKENIZER, 30, prompt="a picture of ")(
        [{"pixel_values": torch.randn(3, 32, 32), "text": "a red circle", "image_id": 0}]
    )
    task = CaptionTask(model, prompt_length=4)  # [DEC] a picture of
    loss = task(batch)["loss"]
    ids, targets = decoder_targets(batch["input_ids"], batch["attention_mask"], bos_id=model.config.text.bos_token_id)
    targets[:, :4] = -100
    logits = model.lm_logits(ids, batch["attention_mask"], model.encode_image(batch["pixel_values"]))
    per_token = token_losses(logits, targets, 0.1)
    assert loss.item() == pytest.approx(per_token.sum().item() / 4, rel=1e-5)  # "a red circle [SEP]"


def test_vqa_task_equals_question_states_repeated_per_answer():
    model = _model("vqa")
    batch = _questions()
    task = VqaTask(model).train()
    loss = task(batch)["loss"]
    loss.backward()
    _all_trainable_get_gradients(task)
    # The same loss with each question's states copied once per answer, as the original code does.
    with torch.no_grad():
        image_embeds = model.encode_image(batch["pixel_values"])
        states = model.encode_multimodal(batch["input_ids"], batch["attention_mask"], image_embeds)
        owner = batch["answer_owner"]
        ids, targets = decoder_targets(batch["answer_ids"], batch["answer_mask"], bos_id=model.config.text.bos_token_id)
        logits = model.lm_logits(ids, batch["answer_mask"], states[owner], batch["attention_mask"][owner])
        per_answer = token_losses(logits, targets, 0.1).sum(1)
        expected = (batch["answer_weights"] * per_answer).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_retrieval_task_and_enc_start_token():
    model = _model("retrieval")
    task = RetrievalTask(model, queue_size=16, itm_token_id=model.config.enc_token_id).train()
    task.before_step(0)
    out = task(_pairs())
    assert set(out) == {"itc_loss", "itm_loss", "loss"}
    out["loss"].backward()
    _all_trainable_get_gradients(task)
    assert task.itc.idx_queue[0, :4].tolist() == [0, 0, 1, 1]


def test_export_parts_of_a_pretrained_model():
    pretrain = _model("pretrain", seed=3)
    tie_text_layers(pretrain)
    source = pretrain.state_dict()
    for kind in ("caption", "vqa", "retrieval"):
        part = model_for_kind(pretrain, kind)
        assert part.config.kind == kind
        for key, value in part.state_dict().items():
            assert torch.equal(value, source[key]), f"{kind}: {key}"
    with pytest.raises(CheckpointError, match="cannot be made from a 'caption' model"):
        model_for_kind(_model("caption"), "retrieval")
