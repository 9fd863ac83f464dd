"""Static-cache decoding of BLIP-2's OPT (`StaticCausalLmStepper`) gives the eager `CausalLmStepper`'s ids and scores:
left-padded prefixes of different lengths, shared group heads (one image, several prompts), greedy, beam search with
sources finishing early, sampling with one seed and with per-source generators, at source counts that are and are not
bucket sizes, uncaptured and through a fake graph capture."""

from __future__ import annotations

import pytest
import torch

from blip.blip2_config import OptConfig
from blip.models.blip2.opt import OptForCausalLM
from blip.models.generation import CausalLmStepper, GenerationConfig, generate
from blip.models.static_decode import GraphCache, StaticCausalLmStepper, causal_lm_stepper

VOCAB, EOS, BOS, IMAGE, QUERIES = 40, 2, 2, 39, 4


@pytest.fixture(scope="module")
def lm() -> OptForCausalLM:
    torch.manual_seed(0)
    model = OptForCausalLM(
        OptConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=48,
            num_attention_heads=4,
            max_position_embeddings=64,
        )  # fmt: skip
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn_like(p) if "layer_norm" in name and name.endswith("weight") else p.normal_(0, 0.2)
            )
        model.model.decoder.embed_tokens.weight[EOS] *= 2.5  # ends come early, at different steps
    return model


def _prefixes(lm, prompt_lengths: list[int], shared: bool, seed: int):
    """Left-padded prefix embeddings (query vectors, BOS, prompt ids), their mask and ids; with `shared`, sources
    come in pairs with the same query vectors and the same first prompt ids (one image, two prompts)."""
    gen = torch.Generator().manual_seed(seed)
    rows, groups = [], []
    for s, n in enumerate(prompt_lengths):
        group = s // 2 if shared else s
        same = torch.Generator().manual_seed(1000 + group)
        common = torch.randint(3, VOCAB - 1, (2,), generator=same).tolist()
        own = torch.randint(3, VOCAB - 1, (n,), generator=gen).tolist()
        ids = [IMAGE] * QUERIES + [BOS] + (common + own if shared else own)
        with torch.no_grad():
            embeds = lm.embed_tokens(torch.tensor([ids]))[0].clone()
        embeds[:QUERIES] = torch.randn(QUERIES, embeds.shape[1], generator=same)
        rows.append((ids, embeds))
        groups.append(group)
    longest = max(len(ids) for ids, _ in rows)
    embeds = torch.randn(len(rows), longest, rows[0][1].shape[1], generator=gen) * 7  # garbage under the padding
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, (ids, e) in enumerate(rows):
        embeds[i, longest - len(ids) :], mask[i, longest - len(ids) :] = e, 1
    return embeds, mask, [ids for ids, _ in rows], groups if shared else None


def _config(**settings) -> GenerationConfig:
    cfg = dict(
        max_new_tokens=8, min_new_tokens=0, num_beams=1, do_sample=False, top_p=1.0, top_k=0, temperature=1.0,
        repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=1, seed=None, decode="static",
    )  # fmt: skip
    return GenerationConfig(**{**cfg, **settings})


SETTINGS = {
    "greedy": dict(),
    "greedy-penalties": dict(min_new_tokens=3, repetition_penalty=1.5),
    "beam3": dict(num_beams=3),
    "beam-several": dict(num_beams=4, num_return_sequences=3, length_penalty=0.6),
    "sample-seed": dict(do_sample=True, seed=3, num_return_sequences=2, top_k=10),
}


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("count", [4, 5])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_static_opt_equals_eager(lm, name, count, shared):
    embeds, mask, ids, groups = _prefixes(lm, [0, 3, 1, 5, 2][:count], shared, seed=count)
    cfg = _config(**SETTINGS[name])
    eager = generate(CausalLmStepper(lm, embeds, mask, ids, groups), cfg, eos_id=EOS)
    static = generate(StaticCausalLmStepper(lm, embeds, mask, ids, groups), cfg, eos_id=EOS)
    assert [[s.token_ids for s in r] for r in static] == [[s.token_ids for s in r] for r in eager]
    for a, b in zip(sum(eager, []), sum(static, [])):
        assert b.score == pytest.approx(a.score, abs=1e-5)
    lengths = {len(s.token_ids) - len(i) for r, i in zip(eager, ids) for s in r}
    assert len(lengths) > 1  # rows finish at different steps


def test_static_opt_with_per_source_generators_and_a_fake_graph(lm):
    embeds, mask, ids, _ = _prefixes(lm, [2, 0, 4], False, seed=9)
    cfg = _config(do_sample=True, num_return_sequences=3, top_p=0.9)
    captures = []

    def capture(step):
        captures.append(step)
        out = step()

        def replay():
            out.copy_(step())
            return out

        return replay

    graphs = GraphCache(capture=capture)
    results = {}
    for name in ("eager", "static", "again"):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        stepper = (
            CausalLmStepper(lm, embeds, mask, ids)
            if name == "eager"
            else StaticCausalLmStepper(lm, embeds, mask, ids, graphs=graphs)
        )
        results[name] = [[s.token_ids for s in r] for r in generate(stepper, cfg, eos_id=EOS, generators=gens)]
    assert results["static"] == results["eager"] == results["again"]
    assert len(captures) == 1 and stepper.key.length % 32 == 0 and stepper.key.rows == 4 * 3


def test_mode_picks_the_opt_stepper(lm):
    embeds, mask, ids, _ = _prefixes(lm, [1], False, seed=1)
    assert isinstance(causal_lm_stepper(lm, embeds, mask, ids, None, "static"), StaticCausalLmStepper)
    assert type(causal_lm_stepper(lm, embeds, mask, ids, None, "auto")) is CausalLmStepper
