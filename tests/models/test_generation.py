"""The one decoding loop (`blip.models.generation.generate`) driving a decoder-only LM over per-source prefixes of
input embeddings (`CausalLmStepper`, BLIP-2's OPT path) gives transformers' `generate` ids and scores for each
source run alone: greedy, beam, several sequences, min length, repetition and length penalties, several EOS ids,
sources with prefixes of different lengths decoded together. (BLIP's `TextDecoderStepper` is covered by the BLIP
oracle and golden tests; the T5 path by the BLIP-2 task tests.)"""

from __future__ import annotations

import pytest
import torch

from blip.blip2_config import OptConfig
from blip.models.blip2.opt import OptForCausalLM
from blip.models.generation import CausalLmStepper, GenerationConfig, generate

transformers = pytest.importorskip("transformers")

VOCAB, EOS, BOS, PAD, IMAGE = 40, 2, 2, 1, 39  # OPT: BOS = EOS = 2 ("</s>"), pad 1; the image placeholder id last
QUERIES = 4  # "query" embeddings before each prefix's ids, as BLIP-2 puts them


@pytest.fixture(scope="module")
def lms():
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
        hf.model.decoder.embed_tokens.weight[EOS] *= 2.5  # tied head: ends come early, at different steps
    ours = OptForCausalLM(OptConfig.from_hf_dict(config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _sources(ours, prompt_lengths: list[int], seed: int):
    """Per source: its input ids (QUERIES image placeholders, BOS, prompt ids) and input embeddings (the placeholders'
    rows replaced by random "query" vectors), as BLIP-2 builds them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in prompt_lengths:
        ids = [IMAGE] * QUERIES + [BOS] + torch.randint(3, VOCAB - 1, (n,), generator=gen).tolist()
        with torch.no_grad():
            embeds = ours.embed_tokens(torch.tensor([ids]))[0].clone()
        embeds[:QUERIES] = torch.randn(QUERIES, embeds.shape[1], generator=gen)
        out.append((ids, embeds))
    return out


def _ours(ours, sources, eos=EOS, **settings) -> list:
    longest = max(len(ids) for ids, _ in sources)
    embeds = torch.zeros(len(sources), longest, sources[0][1].shape[1])
    mask = torch.zeros(len(sources), longest, dtype=torch.long)
    for i, (ids, e) in enumerate(sources):  # left padding, garbage in the padded positions
        embeds[i] = torch.randn(longest, e.shape[1]) * 7
        embeds[i, longest - len(ids) :] = e
        mask[i, longest - len(ids) :] = 1
    cfg = dict(
        max_new_tokens=8, min_new_tokens=0, num_beams=1, do_sample=False, top_p=1.0, top_k=0, temperature=1.0,
        repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=1, seed=None,
    )  # fmt: skip
    cfg.update(settings)
    stepper = CausalLmStepper(ours, embeds, mask, [ids for ids, _ in sources])
    return generate(stepper, GenerationConfig(**cfg), eos_id=eos)


def _theirs(hf, ids, embeds, eos=EOS, **settings):
    """transformers on one source: (token ids of each returned sequence, unpadded, and its score)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(
            inputs_embeds=embeds[None],
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            eos_token_id=eos,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
            do_sample=False,
            **settings,
        )
    eos_ids = [eos] if isinstance(eos, int) else eos
    results = []
    for r, seq in enumerate(out.sequences.tolist()):
        new = seq[len(ids) :]
        end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        if settings.get("num_beams", 1) > 1:
            score = out.sequences_scores[r].item()
        else:
            score = sum(torch.log_softmax(s[r].float(), -1)[t].item() for s, t in zip(out.scores, new[:end]))
        results.append((ids + new[:end], score))
    return results


SETTINGS = {
    "greedy": dict(),
    "greedy-penalties": dict(min_new_tokens=3, repetition_penalty=1.5),
    "beam": dict(num_beams=3),
    "beam-several": dict(num_beams=4, num_return_sequences=3, length_penalty=0.6, repetition_penalty=1.2),
    "beam-min-long": dict(num_beams=2, min_new_tokens=4, length_penalty=2.0, max_new_tokens=10),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_decoder_only_prefixes_of_different_lengths_equal_transformers_alone(lms, name):
    hf, ours = lms
    settings = SETTINGS[name]
    sources = _sources(ours, [0, 3, 1, 5, 2], seed=len(name))
    mine = _ours(ours, sources, **settings)
    lengths = set()
    for (ids, embeds), sequences in zip(sources, mine):
        theirs = _theirs(hf, ids, embeds, **{"max_new_tokens": 8, **settings})
        assert [s.token_ids for s in sequences] == [t for t, _ in theirs], name
        for s, (_, score) in zip(sequences, theirs):
            assert s.score == pytest.approx(score, abs=1e-4)
        lengths.update(len(s.token_ids) - len(ids) for s in sequences)
    assert len(lengths) > 1, "sequences should end at different steps, so sources leave the batch"


def test_several_eos_ids_equal_transformers(lms):
    hf, ours = lms
    sources = _sources(ours, [2, 0, 4], seed=3)
    for settings in (dict(), dict(num_beams=3, num_return_sequences=2)):
        mine = _ours(ours, sources, eos=[EOS, 7, 11], **settings)
        for (ids, embeds), sequences in zip(sources, mine):
            theirs = _theirs(hf, ids, embeds, eos=[EOS, 7, 11], max_new_tokens=8, **settings)
            assert [s.token_ids for s in sequences] == [t for t, _ in theirs]


def test_repetition_penalty_sees_each_rows_own_prefix_not_padding(lms):
    """The pad id of other rows' padding is never penalised: a row's result is the same alone and batched with a
    longer prefix."""
    _, ours = lms
    sources = _sources(ours, [0, 6], seed=5)
    settings = dict(repetition_penalty=3.0, max_new_tokens=6)
    alone = _ours(ours, sources[:1], **settings)[0][0].token_ids
    batched = _ours(ours, sources, **settings)[0][0].token_ids
    assert alone == batched


def test_sampling_is_per_source_and_seeded(lms):
    _, ours = lms
    sources = _sources(ours, [1, 3, 0], seed=8)

    def sample(srcs, seeds):
        longest = max(len(ids) for ids, _ in srcs)
        embeds = torch.zeros(len(srcs), longest, srcs[0][1].shape[1])
        mask = torch.zeros(len(srcs), longest, dtype=torch.long)
        for i, (ids, e) in enumerate(srcs):
            embeds[i, longest - len(ids) :], mask[i, longest - len(ids) :] = e, 1
        cfg = GenerationConfig(
            max_new_tokens=6, min_new_tokens=0, num_beams=1, do_sample=True, top_p=0.9, top_k=0, temperature=1.5,
            repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=3, seed=None,
        )  # fmt: skip
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = generate(CausalLmStepper(ours, embeds, mask, [i for i, _ in srcs]), cfg, eos_id=EOS, generators=gens)
        return [[s.token_ids for s in seqs] for seqs in out]

    together = sample(sources, [1, 2, 3])
    assert together == sample(sources, [1, 2, 3])
    assert sample(sources[1:2], [2]) == together[1:2]  # independent of the other sources in the batch
    assert len({tuple(t) for t in together[0]}) > 1  # the rows of a source draw different samples
