"""Text generation for the BLIP decoder: greedy, beam search and nucleus/top-k sampling.

Every decode starts from the same prefix (`[DEC]` plus an optional prompt) for `E` sources (images, or questions
for VQA) whose cross-attention keys/values were projected once (`CrossKV`). Rows are grouped per source
(`num_beams` or `num_return_sequences` rows each), so no image state is ever copied per row or per step, and a
source leaves the batch as soon as its result is final.

The decoding rules (logits processing order, beam bookkeeping, length normalisation, stopping) follow what
transformers' `generate` does, so the same checkpoint gives the same token ids; see docs/generation.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from blip.models.bert import CrossKV, KVCache, TextDecoder

NEG_INF_SCORE = -1.0e9  # transformers' "impossible" beam score


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
        )
        if not ok:
            raise ValueError(f"invalid generation settings (check them with blip.tasks.options first): {self}")


@dataclass
class Sequence:
    token_ids: list[int]  # prefix + generated tokens (+ [SEP] when finished), unpadded
    score: float


def _process_logits(
    scores: torch.Tensor, sequences: torch.Tensor, new_len: int, cfg: GenerationConfig, eos_id: int
) -> torch.Tensor:
    """Repetition penalty, then min-length, as transformers orders them. Modifies `scores` in place."""
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, sequences)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores.scatter_(1, sequences, seen)
    if new_len < cfg.min_new_tokens:
        scores[:, eos_id] = -math.inf
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


@torch.inference_mode()
def generate(
    decoder: TextDecoder,
    cross: CrossKV,
    prefix_ids: list[int],
    cfg: GenerationConfig,
    *,
    eos_id: int,
    generators: SequenceOf[torch.Generator] | None = None,
) -> list[list[Sequence]]:
    """Decode for each of the `E` sources in `cross`; returns `num_return_sequences` sequences per source.

    `generators` (sampling only): one random generator per source, used for that source's rows alone, so what a
    source samples depends on its generator and not on the other sources in the batch (`cfg.seed` is then unused)."""
    cfg.validate()
    if cross.index is not None:
        raise ValueError("generation needs grouped cross-attention states (no row index)")
    if generators is not None and len(generators) != cross.keys[0].shape[0]:
        raise ValueError(f"{len(generators)} generators for {cross.keys[0].shape[0]} sources")
    if cfg.num_beams > 1:
        return _beam_search(decoder, cross, prefix_ids, cfg, eos_id)
    return _sample_or_greedy(decoder, cross, prefix_ids, cfg, eos_id, generators)


def _prefix(prefix_ids: list[int], rows: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(prefix_ids, dtype=torch.long, device=device).expand(rows, -1)


def _sample_or_greedy(
    decoder: TextDecoder,
    cross: CrossKV,
    prefix_ids: list[int],
    cfg: GenerationConfig,
    eos_id: int,
    generators: SequenceOf[torch.Generator] | None = None,
) -> list[list[Sequence]]:
    num_sources, per_source = cross.keys[0].shape[0], cfg.num_return_sequences
    device = cross.keys[0].device
    prefix_len, total = len(prefix_ids), len(prefix_ids) + cfg.max_new_tokens
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    rows = num_sources * per_source
    sequences = torch.zeros(rows, total, dtype=torch.long, device=device)
    sequences[:, :prefix_len] = _prefix(prefix_ids, rows, device)
    scores = torch.zeros(rows, dtype=torch.float32, device=device)
    lengths = torch.full((rows,), total, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(num_sources, device=device)  # sources still in the batch
    cache = KVCache(len(decoder.bert.layers), total)

    step_ids = sequences[:, :prefix_len]
    for cur_len in range(prefix_len, total):
        rows_idx = (active[:, None] * per_source + torch.arange(per_source, device=device)).reshape(-1)
        logits = decoder(step_ids, cross=cross, cache=cache, last_only=True).float()
        logits = _process_logits(logits, sequences[rows_idx, :cur_len], cur_len - prefix_len, cfg, eos_id)
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
        tokens = torch.where(was_finished, torch.zeros_like(tokens), tokens)
        sequences[rows_idx, cur_len] = tokens
        scores[rows_idx] += torch.where(was_finished, torch.zeros_like(logprobs), logprobs)
        just_done = (~was_finished) & (tokens == eos_id)
        lengths[rows_idx[just_done]] = cur_len + 1
        finished[rows_idx] = was_finished | just_done

        # Sources whose rows are all finished leave the batch with their cache rows and cross-attention states.
        source_done = finished[rows_idx].view(-1, per_source).all(dim=1)
        if bool(source_done.all()):
            break
        if bool(source_done.any()):
            keep = (~source_done).nonzero().squeeze(1)
            keep_rows = (keep[:, None] * per_source + torch.arange(per_source, device=device)).reshape(-1)
            cache.select(keep_rows)
            cross = cross.select(keep)
            active = active[keep]
            tokens = tokens[keep_rows]
        step_ids = tokens[:, None]

    out: list[list[Sequence]] = []
    seqs, lens, scs = sequences.tolist(), lengths.tolist(), scores.tolist()
    for source in range(num_sources):
        out.append(
            [Sequence(seqs[r][: lens[r]], scs[r]) for r in range(source * per_source, (source + 1) * per_source)]
        )
    return out


def _beam_search(
    decoder: TextDecoder, cross: CrossKV, prefix_ids: list[int], cfg: GenerationConfig, eos_id: int
) -> list[list[Sequence]]:
    num_sources, k = cross.keys[0].shape[0], cfg.num_beams
    device = cross.keys[0].device
    prefix_len, total = len(prefix_ids), len(prefix_ids) + cfg.max_new_tokens
    candidates = 2 * k  # transformers keeps (1 + number of EOS ids) * num_beams candidates, at least 2 * num_beams

    # Running beams of the sources still in the batch.
    running = torch.zeros(num_sources, k, total, dtype=torch.long, device=device)
    running[:, :, :prefix_len] = torch.tensor(prefix_ids, device=device)
    running_scores = torch.zeros(num_sources, k, device=device)
    running_scores[:, 1:] = NEG_INF_SCORE
    # Finished hypotheses, kept for all sources (indexed by source id).
    best = torch.zeros(num_sources, k, total, dtype=torch.long, device=device)
    best_scores = torch.full((num_sources, k), NEG_INF_SCORE, device=device)
    best_lengths = torch.zeros(num_sources, k, dtype=torch.long, device=device)
    best_finished = torch.zeros(num_sources, k, dtype=torch.bool, device=device)

    active = torch.arange(num_sources, device=device)
    cache = KVCache(len(decoder.bert.layers), total)
    top_k_mask = torch.arange(candidates, device=device) < k
    step_ids = running[:, :, :prefix_len].reshape(-1, prefix_len)

    for cur_len in range(prefix_len, total):
        n = active.shape[0]
        logits = decoder(step_ids, cross=cross, cache=cache, last_only=True).float()
        logprobs = logits.log_softmax(-1)
        logprobs = _process_logits(
            logprobs, running[:, :, :cur_len].reshape(n * k, cur_len), cur_len - prefix_len, cfg, eos_id
        )
        vocab = logprobs.shape[-1]
        totals = (logprobs.view(n, k, vocab) + running_scores[:, :, None]).view(n, k * vocab)
        cand_scores, cand_index = torch.topk(totals, candidates, dim=1)  # (n, 2k), sorted
        cand_beam, cand_token = cand_index // vocab, cand_index % vocab
        cand_seqs = running.gather(1, cand_beam[:, :, None].expand(-1, -1, total)).clone()
        cand_seqs[:, :, cur_len] = cand_token
        hits = (cand_token == eos_id) | (cur_len + 1 >= total)

        # Continue with the best k candidates that did not finish.
        cont_scores = cand_scores + hits.float() * NEG_INF_SCORE
        keep = torch.topk(cont_scores, k, dim=1).indices
        running = cand_seqs.gather(1, keep[:, :, None].expand(-1, -1, total))
        running_scores = cont_scores.gather(1, keep)
        source_beam = cand_beam.gather(1, keep)

        # Merge finished candidates (only those ranked within the top k) into each source's best hypotheses.
        gen_len = cur_len + 1 - prefix_len
        norm_scores = cand_scores / (gen_len**cfg.length_penalty)
        just_finished = hits & top_k_mask[None, :]
        prev_scores, prev_seqs = best_scores[active], best[active]
        prev_lengths, prev_finished = best_lengths[active], best_finished[active]
        norm_scores = norm_scores + (~just_finished).float() * NEG_INF_SCORE
        merged_scores = torch.cat([prev_scores, norm_scores], dim=1)
        pick = torch.topk(merged_scores, k, dim=1).indices
        merged_seqs = torch.cat([prev_seqs, cand_seqs], dim=1)
        merged_lengths = torch.cat([prev_lengths, torch.full_like(cand_token, cur_len + 1)], dim=1)
        merged_finished = torch.cat([prev_finished, just_finished], dim=1)
        best[active] = merged_seqs.gather(1, pick[:, :, None].expand(-1, -1, total))
        best_scores[active] = merged_scores.gather(1, pick)
        best_lengths[active] = merged_lengths.gather(1, pick)
        best_finished[active] = merged_finished.gather(1, pick)

        # A source is final once all k slots are finished and its best running beam cannot beat the worst of them
        # (transformers' early_stopping=False heuristic), or at the length limit.
        if cur_len + 1 >= total:
            break
        slots_full = best_finished[active].all(dim=1)
        best_possible = running_scores[:, 0] / ((cur_len + 1 - prefix_len) ** cfg.length_penalty)
        worst_kept = best_scores[active].min(dim=1).values
        improvable = ~slots_full | (best_possible > worst_kept)
        if not bool(improvable.any()):
            break

        beam_rows = torch.arange(n, device=device)[:, None] * k + source_beam  # (n, k) cache rows to continue
        if not bool(improvable.all()):
            keep_sources = improvable.nonzero().squeeze(1)
            beam_rows = beam_rows[keep_sources]
            cross = cross.select(keep_sources)
            active = active[keep_sources]
            running, running_scores = running[keep_sources], running_scores[keep_sources]
        cache.select(beam_rows.reshape(-1))
        step_ids = running[:, :, cur_len].reshape(-1, 1)

    out: list[list[Sequence]] = []
    seqs, lens, scs = best.tolist(), best_lengths.tolist(), best_scores.tolist()
    for source in range(num_sources):
        out.append(
            [Sequence(seqs[source][j][: lens[source][j]], scs[source][j]) for j in range(cfg.num_return_sequences)]
        )
    return out
