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


def _left_padded(sources, garbage: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sources' prefix embeddings left-padded to the longest, and their mask (1 = real); `garbage`: random values
    in the padded positions instead of zeros."""
    longest = max(len(ids) for ids, _ in sources)
    embeds = torch.zeros(len(sources), longest, sources[0][1].shape[1])
    mask = torch.zeros(len(sources), longest, dtype=torch.long)
    for i, (ids, e) in enumerate(sources):
        if garbage:
            embeds[i] = torch.randn(longest, e.shape[1]) * 7
        embeds[i, longest - len(ids) :], mask[i, longest - len(ids) :] = e, 1
    return embeds, mask


def _ours(ours, sources, eos=EOS, groups=None, **settings) -> list:
    embeds, mask = _left_padded(sources, garbage=True)
    cfg = dict(
        max_new_tokens=8, min_new_tokens=0, num_beams=1, do_sample=False, top_p=1.0, top_k=0, temperature=1.0,
        repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=1, seed=None, decode="eager",
    )  # fmt: skip
    cfg.update(settings)
    stepper = CausalLmStepper(ours, embeds, mask, [ids for ids, _ in sources], groups=groups)
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
        embeds, mask = _left_padded(srcs)
        cfg = GenerationConfig(
            max_new_tokens=6, min_new_tokens=0, num_beams=1, do_sample=True, top_p=0.9, top_k=0, temperature=1.5,
            repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=3, seed=None, decode="eager",
        )  # fmt: skip
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = generate(CausalLmStepper(ours, embeds, mask, [i for i, _ in srcs]), cfg, eos_id=EOS, generators=gens)
        return [[s.token_ids for s in seqs] for seqs in out]

    together = sample(sources, [1, 2, 3])
    assert together == sample(sources, [1, 2, 3])
    assert sample(sources[1:2], [2]) == together[1:2]  # independent of the other sources in the batch
    assert len({tuple(t) for t in together[0]}) > 1  # the rows of a source draw different samples


def _shared_sources(ours, seed: int):
    """Sources in groups that share their query vectors, BOS and the start of their prompt (as the questions of one
    image share "Question:"), with own suffixes of different lengths; one group has a single source, and one source
    is another's whole prefix plus nothing (so the shared part must stop one id short of it)."""
    gen = torch.Generator().manual_seed(seed)
    width = ours.config.hidden_size
    plan = [  # group: (shared prompt ids, own suffix lengths)
        (0, [5, 6, 7], [3, 0, 1, 4]),
        (1, [8], [2, 5]),
        (2, [9, 10], [1]),
    ]
    sources, groups = [], []
    for group, common, suffixes in plan:
        queries = torch.randn(QUERIES, width, generator=gen)
        for n in suffixes:
            ids = [IMAGE] * QUERIES + [BOS] + common + torch.randint(3, VOCAB - 1, (n,), generator=gen).tolist()
            with torch.no_grad():
                embeds = ours.embed_tokens(torch.tensor([ids]))[0].clone()
            embeds[:QUERIES] = queries
            sources.append((ids, embeds))
            groups.append(group)
    order = [3, 0, 5, 1, 6, 2, 4]  # groups interleaved in the batch
    return [sources[i] for i in order], [groups[i] for i in order]


@pytest.mark.parametrize("name", ["greedy", "greedy-penalties", "beam-several"])
def test_shared_prefixes_give_each_sources_result_alone(lms, name):
    """Sources grouped by shared prefix (the questions of one image): the shared part runs once per group, and every
    source still gets transformers' result for that source alone."""
    hf, ours = lms
    settings = SETTINGS[name]
    sources, groups = _shared_sources(ours, seed=len(name))
    mine = _ours(ours, sources, groups=groups, **settings)
    assert [[s.token_ids for s in seqs] for seqs in mine] == [
        [s.token_ids for s in seqs] for seqs in _ours(ours, sources, **settings)
    ]
    for (ids, embeds), sequences in zip(sources, mine):
        theirs = _theirs(hf, ids, embeds, **{"max_new_tokens": 8, **settings})
        assert [s.token_ids for s in sequences] == [t for t, _ in theirs], name
        for s, (_, score) in zip(sequences, theirs):
            assert s.score == pytest.approx(score, abs=1e-4)


def test_shared_prefix_runs_once_per_group(lms):
    """The LM sees each group's shared part once: positions run = shared parts + padded suffixes, not the sources'
    whole prefixes."""
    _, ours = lms
    sources, groups = _shared_sources(ours, seed=1)
    seen = []

    class Counting:
        def __init__(self, lm):
            self.lm = lm

        def embed_tokens(self, ids):
            return self.lm.embed_tokens(ids)

        def new_cache(self, capacity):
            return self.lm.new_cache(capacity)

        def packed_prefill(self, embeds, positions, mask, *, cache):
            seen.append(("packed", tuple(embeds.shape[:2]), positions.max(1).values.tolist()))
            return self.lm.packed_prefill(embeds, positions, mask, cache=cache)

        def logits_of(self, hidden):
            return self.lm.logits_of(hidden)

        def __call__(self, embeds, mask, *, cache, last_only):
            seen.append(("own", tuple(embeds.shape[:2]), int(mask[:, -embeds.shape[1] :].sum())))
            return self.lm(embeds, mask, cache=cache, last_only=last_only)

    embeds, mask = _left_padded(sources)
    cfg = GenerationConfig(
        max_new_tokens=1, min_new_tokens=1, num_beams=1, do_sample=False, top_p=1.0, top_k=0, temperature=1.0,
        repetition_penalty=1.0, length_penalty=1.0, num_return_sequences=1, seed=None, decode="eager",
    )  # fmt: skip
    generate(CausalLmStepper(Counting(ours), embeds, mask, [i for i, _ in sources], groups=groups), cfg, eos_id=EOS)
    # group 0: 4 queries + BOS + 3 common ids, but one source has no suffix: 7 shared, its last id its own;
    # group 1: 4 + 1 + 1 = 6 shared; group 2 (one source): all but its last id (4 + 1 + 2 + 1 - 1 = 7)
    shared = {0: 7, 1: 6, 2: 7}
    own = {0: [4, 1, 2, 5], 1: [2, 5], 2: [1]}  # per group: each source's ids after the shared part
    # one pass: a row per group holding its shared part and every suffix once (left-padded to the longest row);
    # each suffix's positions continue from its group's shared part
    longest = max(shared[g] + sum(own[g]) for g in shared)
    assert seen == [("packed", (3, longest), [shared[g] + max(own[g]) - 1 for g in (0, 1, 2)])]


def test_groups_must_match_the_sources(lms):
    _, ours = lms
    with pytest.raises(ValueError, match="2 groups for 3 sources"):
        CausalLmStepper(ours, torch.zeros(3, 4, 32), torch.ones(3, 4), [[1]] * 3, groups=[0, 0])
