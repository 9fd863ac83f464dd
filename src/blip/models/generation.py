"""Text generation: greedy, beam search and nucleus/top-k sampling, one decoding loop for every model family.

The loop (`generate`) knows nothing about the model. It drives a `Stepper`: the decoding state of `E` sources
(images, or questions, or image + prompt pairs), each with its own prefix, whose rows are grouped per source
(`num_beams` or `num_return_sequences` rows each). Three steppers serve the three families:

- `TextDecoderStepper`: BLIP's text decoder, `[DEC]` + prompt ids shared by all sources, cross-attending to each
  source's keys/values projected once (`CrossKV`);
- `CausalLmStepper`: a decoder-only LM (BLIP-2's OPT) continuing a per-source prefix of input embeddings (query
  embeddings + prompt tokens), left-padded to the longest with an attention mask;
- `EncoderDecoderStepper`: an encoder-decoder LM (BLIP-2's T5) whose decoder starts from its start token and
  cross-attends to each source's encoder states, projected once.

Each source's prefix runs once (not once per beam or sample), then its cache rows are copied to its rows; no encoder
state is ever copied per row or per step, and a source leaves the batch as soon as its result is final.

The decoding rules (logits processing order, beam bookkeeping, length normalisation, stopping) follow what
transformers' `generate` does for that source alone, so the same checkpoint gives the same token ids; lengths count
new tokens, so sources with prefixes of different lengths decode together; see docs/generation.md.

Streaming: within `with token_listener(callback):`, greedy and sampling decoding report each step's new tokens as they
are chosen (`TokenListener`), without any task function passing anything along; beam search reports nothing (no
beam's tokens are final before the end).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Protocol

import torch

from blip.models.bert import CrossKV, KVCache, TextDecoder

NEG_INF_SCORE = -1.0e9  # transformers' "impossible" beam score
DECODE_MODES = ("auto", "static", "eager")  # which stepper a task builds (blip.models.static_decode); same results
PAD_ID = 0  # what a finished row is fed (its later logits are never read)
FINISHED_CHECK_EVERY = 4  # fixed-shape greedy decoding: steps between checks that every row is finished


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """The decoding settings, all given: user-facing defaults, ranges and their error messages live in one place,
    `blip.tasks.options` (`CaptionOptions.generation()` builds one). `validate` only guards this module's invariants."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    do_sample: bool
    top_p: float  # nucleus mass (sampling only; 1.0 disables)
    top_k: int  # keep the k most likely tokens (sampling only; 0 disables)
    temperature: float  # sampling only
    repetition_penalty: float
    length_penalty: float  # beam only: score / generated_length ** length_penalty
    num_return_sequences: int
    seed: int | None
    decode: str  # one of DECODE_MODES: read by the task that builds the stepper, not by the loop

    def validate(self) -> None:
        ok = (
            1 <= self.max_new_tokens
            and 0 <= self.min_new_tokens <= self.max_new_tokens
            and self.num_beams >= 1
            and not (self.do_sample and self.num_beams > 1)
            and 1 <= self.num_return_sequences <= (self.num_return_sequences if self.do_sample else self.num_beams)
            and 0.0 < self.top_p <= 1.0
            and self.top_k >= 0
            and self.temperature > 0
            and self.repetition_penalty > 0
            and self.decode in DECODE_MODES
        )
        if not ok:
            raise ValueError(f"invalid generation settings (check them with blip.tasks.options first): {self}")


@dataclass
class Sequence:
    token_ids: list[int]  # the source's prefix ids + generated tokens (+ EOS when finished), unpadded
    score: float


class Stepper(Protocol):
    """A model's decoding state for `E` sources. Rows are grouped per source: after `start(r, ...)` there are `E * r`
    rows, rows `[s * r, (s + 1) * r)` belonging to source `s`."""

    prefix_ids: list[list[int]]  # per source: the ids its rows start from (in the output and the repetition penalty)

    def start(self, rows_per_source: int, max_new_tokens: int) -> torch.Tensor:
        """Run each source's prefix once; next-token logits `[E, V]`. The state then holds `rows_per_source` copies of
        each source, with room for `max_new_tokens` more tokens."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (`[R]`); next-token logits `[R, V]`."""
        ...

    def select(self, rows: torch.Tensor, sources: torch.Tensor | None) -> None:
        """Continue with rows `rows` (indices into the current rows, grouped per source: beam reordering, finished
        sources leaving); `sources`: the sources those rows belong to, in order (None: the same sources as now)."""
        ...


# --- the steppers -----------------------------------------------------------------------------------------------------


class TextDecoderStepper:
    """BLIP's text decoder from the same `prefix_ids` (`[DEC]` + prompt) for every source of `cross`."""

    def __init__(self, decoder: TextDecoder, cross: CrossKV, prefix_ids: list[int]):
        if cross.index is not None:
            raise ValueError("generation needs grouped cross-attention states (no row index)")
        self.decoder, self.cross = decoder, cross
        self.prefix_ids = [list(prefix_ids)] * cross.keys[0].shape[0]
        self.cache: KVCache | None = None

    def start(self, rows_per_source: int, max_new_tokens: int) -> torch.Tensor:
        num_sources, prefix = len(self.prefix_ids), self.prefix_ids[0]
        self.cache = KVCache(len(self.decoder.bert.layers), len(prefix) + max_new_tokens)
        ids = torch.tensor(prefix, dtype=torch.long, device=self.cross.keys[0].device).expand(num_sources, -1)
        logits = self.decoder(ids, cross=self.cross, cache=self.cache, last_only=True)
        _expand_cache(self.cache, num_sources, rows_per_source, logits.device)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens[:, None], cross=self.cross, cache=self.cache, last_only=True)

    def select(self, rows: torch.Tensor, sources: torch.Tensor | None) -> None:
        self.cache.select(rows)
        if sources is not None:
            self.cross = self.cross.select(sources)


class CausalLm(Protocol):
    """What `CausalLmStepper` needs of a decoder-only LM (BLIP-2's `OptForCausalLM`)."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self, capacity: int) -> KVCache: ...

    def __call__(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, cache: KVCache, last_only: bool
    ) -> torch.Tensor: ...

    def packed_prefill(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, *, cache: KVCache
    ) -> torch.Tensor: ...

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor: ...


class CausalLmStepper:
    """A decoder-only LM continuing each source's prefix of input embeddings.

    `embeds [E, P, D]` and `mask [E, P]` (1 = real, 0 = padding) hold the prefixes, padded to the longest (left
    padding, as the callers lay them out); `prefix_ids[s]` are source `s`'s own prefix ids (what transformers'
    `input_ids` holds when that source is generated alone: never padding). Positions come from the mask, so padding
    changes no result.

    `groups[s]` (optional): sources with the same group share the start of their prefix embeddings (the same image's
    query outputs, BOS, and whatever prompt ids they have in common): that shared part runs once per group, in one
    pass with every source's own suffix (a block mask: a suffix sees the shared part and itself), and its keys and
    values are copied by index to the group's sources. A source's cache row is then laid out
    [shared part | padding | own suffix]; positions and the attention mask skip the padding, so
    every row's result is the one it has alone. The shared part is the longest common prefix of the group's
    `prefix_ids`, minus at least one id, so every source has a last position of its own to predict from."""

    def __init__(
        self,
        lm: CausalLm,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        prefix_ids: list[list[int]],
        groups: SequenceOf[int] | None = None,
    ):
        if embeds.shape[:2] != mask.shape or len(prefix_ids) != embeds.shape[0]:
            shapes = f"embeddings {tuple(embeds.shape)}, mask {tuple(mask.shape)}, {len(prefix_ids)} id lists"
            raise ValueError(f"prefixes do not match ({shapes}): one row per source")
        if groups is not None and len(groups) != len(prefix_ids):
            raise ValueError(f"{len(groups)} groups for {len(prefix_ids)} sources")
        self.lm, self.embeds, self.prefix_ids = lm, embeds, [list(ids) for ids in prefix_ids]
        self.mask = mask
        self.groups = None if groups is None else list(groups)
        self.cache: KVCache | None = None
        self.length = 0  # positions filled (prefix + tokens so far)

    def start(self, rows_per_source: int, max_new_tokens: int) -> torch.Tensor:
        logits = self.prefill(max_new_tokens)
        _expand_cache(self.cache, len(self.prefix_ids), rows_per_source, logits.device)
        self.mask = self.mask.repeat_interleave(rows_per_source, dim=0)
        return logits

    def prefill(self, max_new_tokens: int) -> torch.Tensor:
        """`start` before its rows are expanded: the prefixes in a cache of one row per source (room for
        `max_new_tokens` more positions), `mask` `[sources, prefix + new]`; returns each source's next-token logits."""
        shared = self._shared_lengths()
        if shared is None:
            logits = self._start_whole(max_new_tokens)
        else:
            logits = self._start_shared(shared, max_new_tokens)
        self.embeds = None  # the prefix lives in the cache now
        return logits

    def _start_whole(self, max_new_tokens: int) -> torch.Tensor:
        """Every source's whole prefix in one left-padded pass."""
        num_sources, prefix_len = self.mask.shape
        self.mask = torch.cat([self.mask, self.mask.new_ones(num_sources, max_new_tokens)], dim=1)
        self.cache = self.lm.new_cache(prefix_len + max_new_tokens)
        logits = _last(self.lm(self.embeds, self.mask[:, :prefix_len], cache=self.cache, last_only=True))
        self.length = prefix_len
        return logits

    def _shared_lengths(self) -> dict[int, int] | None:
        """Per group: how many leading prefix positions its sources share; None when no group has two sources
        (nothing would be saved)."""
        if self.groups is None or len(set(self.groups)) == len(self.groups):
            return None
        members: dict[int, list[int]] = {}
        for source, group in enumerate(self.groups):
            members.setdefault(group, []).append(source)
        shared = {}
        for group, sources in members.items():
            ids = [self.prefix_ids[s] for s in sources]
            common = min(len(row) for row in ids) - 1  # every source keeps at least its last id
            for n in range(common):
                if any(row[n] != ids[0][n] for row in ids[1:]):
                    common = n
                    break
            shared[group] = max(common, 0)
        return shared if max(shared.values()) > 0 else None

    def _start_shared(self, shared: dict[int, int], max_new_tokens: int) -> torch.Tensor:
        """The groups' shared parts and their sources' suffixes in one pass over the weights: each group's row holds
        its shared part followed by every member's own suffix, each suffix attending to the shared part and to
        itself only (a block mask; its positions continue from the shared part). Each source's cache row is then
        laid out [shared part | padding | own suffix] (positions and the attention mask skip the padding)."""
        num_sources, device = len(self.prefix_ids), self.embeds.device
        order = sorted(shared)
        members = {group: [s for s in range(num_sources) if self.groups[s] == group] for group in order}
        real = [self.mask[s].nonzero().squeeze(1) for s in range(num_sources)]  # each source's real positions
        tails = [real[s][shared[self.groups[s]] :] for s in range(num_sources)]
        packed_len = max(shared[g] + sum(len(tails[s]) for s in members[g]) for g in order)
        head_len, tail_len = max(shared.values()), max(len(t) for t in tails)

        x = self.embeds.new_zeros(len(order), packed_len, self.embeds.shape[2])
        positions = torch.zeros(len(order), packed_len, dtype=torch.long)
        segment = torch.full((len(order), packed_len), -2, dtype=torch.long)  # -2 padding, -1 shared, s: s's suffix
        layout = torch.zeros(num_sources, head_len + tail_len, dtype=torch.long)  # packed position of each slot
        row_of = torch.zeros(num_sources, dtype=torch.long)
        cache_mask = torch.zeros(num_sources, head_len + tail_len, dtype=self.mask.dtype)  # 1 = a real slot
        for r, group in enumerate(order):
            n, first = shared[group], members[group][0]
            at = packed_len - n - sum(len(tails[s]) for s in members[group])  # left padding
            x[r, at : at + n] = self.embeds[first, real[first][:n]]
            positions[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = -1
            head = torch.arange(at, at + n)
            at += n
            for source in members[group]:
                length = len(tails[source])
                x[r, at : at + length] = self.embeds[source, tails[source]]
                positions[r, at : at + length] = torch.arange(n, n + length)
                segment[r, at : at + length] = source
                layout[source, head_len - n : head_len] = head
                layout[source, head_len + tail_len - length :] = torch.arange(at, at + length)
                cache_mask[source, head_len - n : head_len] = 1
                cache_mask[source, head_len + tail_len - length :] = 1
                row_of[source] = r
                at += length
        query, key = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(packed_len, packed_len, dtype=torch.bool).tril()
        mask = causal & (key >= -1) & ((key == -1) | (key == query))
        mask |= torch.eye(packed_len, dtype=torch.bool)  # a padding position sees itself: never an empty row
        packed_cache = self.lm.new_cache(packed_len)
        hidden = self.lm.packed_prefill(x, positions.to(device), mask[:, None].to(device), cache=packed_cache)
        last = layout[:, -1].to(device)  # each source's last suffix position
        rows, layout = row_of.to(device), layout.to(device)
        logits = self.lm.logits_of(hidden[rows, last])  # (E, V)

        def per_source(t: torch.Tensor) -> torch.Tensor:  # (G, H, T, d) -> (E, H, head + tail, d), slot by slot
            return t.transpose(1, 2)[rows[:, None], layout].transpose(1, 2)

        self.cache = self.lm.new_cache(head_len + tail_len + max_new_tokens)
        for i, (k, v) in enumerate(zip(packed_cache.keys, packed_cache.values)):
            if k is not None:
                self.cache.append(i, per_source(k), per_source(v))
        self.cache.advance(head_len + tail_len)
        self.mask = torch.cat([cache_mask.to(device), self.mask.new_ones(num_sources, max_new_tokens)], dim=1)
        self.length = head_len + tail_len
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.length += 1
        embeds = self.lm.embed_tokens(tokens[:, None])
        return _last(self.lm(embeds, self.mask[:, : self.length], cache=self.cache, last_only=True))

    def select(self, rows: torch.Tensor, sources: torch.Tensor | None) -> None:
        self.cache.select(rows)
        self.mask = self.mask.index_select(0, rows)


class EncoderDecoderLm(Protocol):
    """What `EncoderDecoderStepper` needs of an encoder-decoder LM (BLIP-2's `T5ForConditionalGeneration`)."""

    def new_cache(self, capacity: int) -> KVCache: ...

    def decode(
        self, decoder_input_ids: torch.Tensor, cross: CrossKV, cache: KVCache, last_only: bool
    ) -> torch.Tensor: ...


class EncoderDecoderStepper:
    """An encoder-decoder LM's decoder from `start_id`, cross-attending to each source's encoder states (`cross`:
    projected once per source, grouped over the rows)."""

    def __init__(self, lm: EncoderDecoderLm, cross: CrossKV, start_id: int, num_sources: int):
        self.lm, self.cross, self.start_id = lm, cross, start_id
        self.prefix_ids = [[start_id] for _ in range(num_sources)]
        self.cache: KVCache | None = None

    def start(self, rows_per_source: int, max_new_tokens: int) -> torch.Tensor:
        num_sources = len(self.prefix_ids)
        self.cache = self.lm.new_cache(1 + max_new_tokens)
        ids = torch.full((num_sources, 1), self.start_id, dtype=torch.long, device=self.cross.keys[0].device)
        logits = _last(self.lm.decode(ids, self.cross, self.cache, last_only=True))
        _expand_cache(self.cache, num_sources, rows_per_source, logits.device)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return _last(self.lm.decode(tokens[:, None], self.cross, self.cache, last_only=True))

    def select(self, rows: torch.Tensor, sources: torch.Tensor | None) -> None:
        self.cache.select(rows)
        if sources is not None:
            self.cross = self.cross.select(sources)


def _last(logits: torch.Tensor) -> torch.Tensor:
    """`[B, V]` next-token logits from a model's `[B, 1, V]` last-position output (or `[B, V]` as it is)."""
    return logits[:, -1] if logits.dim() == 3 else logits


def _expand_cache(cache: KVCache, num_sources: int, rows_per_source: int, device: torch.device) -> None:
    """Each source's cache row copied to its `rows_per_source` rows."""
    if rows_per_source > 1:
        cache.select(torch.arange(num_sources, device=device).repeat_interleave(rows_per_source))


# --- logits processing ------------------------------------------------------------------------------------------------


def _seen_tokens(prefix_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """`[E, V]` bool: the ids in each source's prefix (transformers' repetition penalty reads the row's `input_ids`;
    a set of ids gives the same scores as its gather/scatter)."""
    seen = torch.zeros(len(prefix_ids), vocab, dtype=torch.bool)
    for source, ids in enumerate(prefix_ids):
        seen[source, [i for i in ids if 0 <= i < vocab]] = True
    return seen.to(device)


def _process_logits(
    scores: torch.Tensor, seen: torch.Tensor | None, new_len: int, cfg: GenerationConfig, eos: torch.Tensor
) -> torch.Tensor:
    """Repetition penalty (on the ids each row has seen), then min-length, as transformers orders them."""
    if seen is not None:
        penalised = torch.where(scores < 0, scores * cfg.repetition_penalty, scores / cfg.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if new_len < cfg.min_new_tokens:
        scores = scores.index_fill(1, eos, -math.inf)
    return scores


def _warp(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of sampling logits."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - cfg.top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -math.inf)
    return logits


# --- streaming --------------------------------------------------------------------------------------------------------

# listener(step, rows, tokens): after step `step` (0 = the first new token) of greedy or sampling decoding, `tokens[i]`
# is the token just chosen for row `rows[i]`. Rows are those still decoding, in order: a row that ended at an earlier
# step is not reported again (its end token is), a step with no such row not at all. Row numbers are those of the
# `generate` call: source s's rows are [s * r, (s + 1) * r) for r = num_return_sequences. An exception raised by the
# listener stops the decoding and leaves `generate` (a streaming client that went away). It runs on the decoding
# thread, between two steps: keep it short.
TokenListener = Callable[[int, list[int], list[int]], None]

_token_listener: contextvars.ContextVar[TokenListener | None] = contextvars.ContextVar("token_listener", default=None)


@contextlib.contextmanager
def token_listener(listener: TokenListener) -> Iterator[None]:
    """Report every new token of the greedy and sampling decoding run inside the block (this thread or task's context)
    to `listener` (`TokenListener`). Costs one host sync per step while set; nothing otherwise."""
    token = _token_listener.set(listener)
    try:
        yield
    finally:
        _token_listener.reset(token)


def _report(listener: TokenListener, step: int, rows: torch.Tensor, tokens: torch.Tensor, done: torch.Tensor) -> None:
    """The step's tokens of the rows not finished before it (if any), read back in one host sync."""
    row_ids, token_ids, was_done = torch.stack([rows, tokens, done.long()]).tolist()
    live = [i for i, d in enumerate(was_done) if not d]
    if live:
        listener(step, [row_ids[i] for i in live], [token_ids[i] for i in live])


# --- the loop ---------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    stepper: Stepper,
    cfg: GenerationConfig,
    *,
    eos_id: int | SequenceOf[int],
    generators: SequenceOf[torch.Generator] | None = None,
) -> list[list[Sequence]]:
    """Decode each of the stepper's sources; returns `num_return_sequences` sequences per source, each its prefix
    ids followed by the generated tokens (ending with an EOS id when finished).

    `eos_id`: one id or several (any of them ends a sequence). `generators` (sampling only): one random generator
    per source, used for that source's rows alone, so what a source samples depends on its generator and not on the
    other sources in the batch (`cfg.seed` is then unused)."""
    cfg.validate()
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    if not eos_ids:
        raise ValueError("generation needs at least one end-of-sequence id")
    num_sources = len(stepper.prefix_ids)
    if generators is not None and len(generators) != num_sources:
        raise ValueError(f"{len(generators)} generators for {num_sources} sources")
    if cfg.num_beams > 1:
        return _beam_search(stepper, cfg, eos_ids)
    return _sample_or_greedy(stepper, cfg, eos_ids, generators)


def _sample_or_greedy(
    stepper: Stepper,
    cfg: GenerationConfig,
    eos_ids: list[int],
    generators: SequenceOf[torch.Generator] | None,
) -> list[list[Sequence]]:
    prefixes, per_source, steps = stepper.prefix_ids, cfg.num_return_sequences, cfg.max_new_tokens
    num_sources = len(prefixes)
    logits = stepper.start(per_source, steps).float().repeat_interleave(per_source, dim=0)
    device, vocab = logits.device, logits.shape[-1]
    eos = torch.tensor(eos_ids, device=device)
    generator = None
    if cfg.do_sample and cfg.seed is not None and generators is None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    rows = num_sources * per_source
    generated = torch.zeros(rows, steps, dtype=torch.long, device=device)
    scores = torch.zeros(rows, dtype=torch.float32, device=device)
    lengths = torch.full((rows,), steps, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(num_sources, device=device)  # sources still in the batch
    rows_idx = torch.arange(rows, device=device)  # their rows
    within = torch.arange(per_source, device=device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = _seen_tokens(prefixes, vocab, device).repeat_interleave(per_source, dim=0)
    # A fixed-shape stepper gains nothing when finished sources leave; greedy rows then all stay (a finished row only
    # adds PAD_ID and a zero score), which saves the host syncs of that bookkeeping. Sampling keeps the eager
    # bookkeeping: which rows draw decides which random numbers each row gets.
    fixed_rows = getattr(stepper, "fixed_shape", False) and not cfg.do_sample
    listener = _token_listener.get()

    for n in range(steps):  # n: tokens generated so far
        logits = _process_logits(logits, seen, n, cfg, eos)
        if cfg.do_sample:
            logits = _warp(logits, cfg)
            probs = logits.softmax(-1)
            if generators is None:
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:  # each source draws from its own generator: batch-independent sampling
                per_row = probs.view(-1, per_source, probs.shape[-1])
                tokens = torch.cat(
                    [torch.multinomial(p, 1, generator=generators[s]) for p, s in zip(per_row, active.tolist())]
                ).squeeze(1)
        else:
            tokens = logits.argmax(-1)
        logprobs = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)

        was_finished = finished[rows_idx]
        tokens = torch.where(was_finished, torch.full_like(tokens, PAD_ID), tokens)
        generated[rows_idx, n] = tokens
        scores[rows_idx] += torch.where(was_finished, torch.zeros_like(logprobs), logprobs)
        just_done = (~was_finished) & torch.isin(tokens, eos)
        lengths[rows_idx] = torch.where(just_done, n + 1, lengths[rows_idx])
        finished[rows_idx] = was_finished | just_done
        if listener is not None:
            _report(listener, n, rows_idx, tokens, was_finished)
        if n + 1 == steps:
            break

        if fixed_rows:  # nothing to gain from leaving; a host sync every few steps only, to stop once all are done
            if (n + 1) % FINISHED_CHECK_EVERY == 0 and bool(finished.all()):
                break
        else:  # sources whose rows are all finished leave the batch with their cache rows and encoder states
            source_done = finished[rows_idx].view(-1, per_source).all(dim=1)
            if bool(source_done.all()):
                break
            if bool(source_done.any()):
                keep = (~source_done).nonzero().squeeze(1)
                keep_rows = (keep[:, None] * per_source + within).reshape(-1)
                stepper.select(keep_rows, keep)
                active, rows_idx, tokens = active[keep], rows_idx[keep_rows], tokens[keep_rows]
                seen = None if seen is None else seen[keep_rows]
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = stepper.step(tokens).float()

    out: list[list[Sequence]] = []
    gens, lens, scs = generated.tolist(), lengths.tolist(), scores.tolist()
    for source in range(num_sources):
        out.append(
            [
                Sequence(prefixes[source] + gens[r][: lens[r]], scs[r])
                for r in range(source * per_source, (source + 1) * per_source)
            ]
        )
    return out


def _beam_search(stepper: Stepper, cfg: GenerationConfig, eos_ids: list[int]) -> list[list[Sequence]]:
    prefixes, k, steps = stepper.prefix_ids, cfg.num_beams, cfg.max_new_tokens
    num_sources = len(prefixes)
    # transformers keeps max(2, 1 + number of EOS ids) * num_beams candidates per step
    candidates = max(2, 1 + len(eos_ids)) * k
    logprobs = stepper.start(k, steps).float().log_softmax(-1).repeat_interleave(k, dim=0)
    device, vocab = logprobs.device, logprobs.shape[-1]
    eos = torch.tensor(eos_ids, device=device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = _seen_tokens(prefixes, vocab, device).repeat_interleave(k, dim=0)

    # Running beams of the sources still in the batch (generated tokens only; the prefix is the source's).
    running = torch.zeros(num_sources, k, steps, dtype=torch.long, device=device)
    running_scores = torch.zeros(num_sources, k, device=device)
    running_scores[:, 1:] = NEG_INF_SCORE
    # Finished hypotheses, kept for all sources (indexed by source id); lengths count generated tokens.
    best = torch.zeros(num_sources, k, steps, dtype=torch.long, device=device)
    best_scores = torch.full((num_sources, k), NEG_INF_SCORE, device=device)
    best_lengths = torch.zeros(num_sources, k, dtype=torch.long, device=device)
    best_finished = torch.zeros(num_sources, k, dtype=torch.bool, device=device)

    active = torch.arange(num_sources, device=device)
    top_k_mask = torch.arange(candidates, device=device) < k

    for n in range(steps):  # n: tokens generated so far
        m = active.shape[0]
        logprobs = _process_logits(logprobs, seen, n, cfg, eos)
        totals = (logprobs.view(m, k, vocab) + running_scores[:, :, None]).view(m, k * vocab)
        cand_scores, cand_index = torch.topk(totals, candidates, dim=1)  # (m, candidates), sorted
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand_seqs = running.gather(1, cand_beam[:, :, None].expand(-1, -1, steps)).clone()
        cand_seqs[:, :, n] = cand_token
        hits = torch.isin(cand_token, eos) | (n + 1 >= steps)

        # Continue with the best k candidates that did not finish.
        cont_scores = cand_scores + hits.float() * NEG_INF_SCORE
        keep = torch.topk(cont_scores, k, dim=1).indices
        running = cand_seqs.gather(1, keep[:, :, None].expand(-1, -1, steps))
        running_scores = cont_scores.gather(1, keep)
        source_beam = cand_beam.gather(1, keep)

        # Merge finished candidates (only those ranked within the top k) into each source's best hypotheses.
        norm_scores = cand_scores / ((n + 1) ** cfg.length_penalty)
        just_finished = hits & top_k_mask[None, :]
        prev_scores, prev_seqs = best_scores[active], best[active]
        prev_lengths, prev_finished = best_lengths[active], best_finished[active]
        norm_scores = norm_scores + (~just_finished).float() * NEG_INF_SCORE
        merged_scores = torch.cat([prev_scores, norm_scores], dim=1)
        pick = torch.topk(merged_scores, k, dim=1).indices
        merged_seqs = torch.cat([prev_seqs, cand_seqs], dim=1)
        merged_lengths = torch.cat([prev_lengths, torch.full_like(cand_token, n + 1)], dim=1)
        merged_finished = torch.cat([prev_finished, just_finished], dim=1)
        best[active] = merged_seqs.gather(1, pick[:, :, None].expand(-1, -1, steps))
        best_scores[active] = merged_scores.gather(1, pick)
        best_lengths[active] = merged_lengths.gather(1, pick)
        best_finished[active] = merged_finished.gather(1, pick)

        # A source is final once all k slots are finished and its best running beam cannot beat the worst of them
        # (transformers' early_stopping=False heuristic), or at the length limit.
        if n + 1 >= steps:
            break
        slots_full = best_finished[active].all(dim=1)
        best_possible = running_scores[:, 0] / ((n + 1) ** cfg.length_penalty)
        worst_kept = best_scores[active].min(dim=1).values
        improvable = ~slots_full | (best_possible > worst_kept)
        if not bool(improvable.any()):
            break

        beam_rows = torch.arange(m, device=device)[:, None] * k + source_beam  # (m, k) rows to continue
        sources = None
        if not bool(improvable.all()):
            sources = improvable.nonzero().squeeze(1)
            beam_rows = beam_rows[sources]
            active, running, running_scores = active[sources], running[sources], running_scores[sources]
        beam_rows = beam_rows.reshape(-1)
        stepper.select(beam_rows, sources)
        tokens = running[:, :, n].reshape(-1)
        if seen is not None:
            seen = seen[beam_rows]
            seen.scatter_(1, tokens[:, None], True)
        logprobs = stepper.step(tokens).float().log_softmax(-1)

    out: list[list[Sequence]] = []
    seqs, lens, scs = best.tolist(), best_lengths.tolist(), best_scores.tolist()
    for source in range(num_sources):
        out.append(
            [
                Sequence(prefixes[source] + seqs[source][j][: lens[source][j]], scs[source][j])
                for j in range(cfg.num_return_sequences)
            ]
        )
    return out
