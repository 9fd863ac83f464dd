"""Decoding with fixed shapes: BLIP's text decoder and BLIP-2's OPT stepped over a static KV cache, on CUDA as a
replayed CUDA graph.

The eager stepper (`generation.TextDecoderStepper`) launches ~15 small kernels per layer per token from Python, and a
batch that loses finished sources changes shape; on a GPU the step then costs the same ~5 ms whatever the batch. Here
every tensor the step touches is allocated once, with a fixed shape, so the step can be captured as one CUDA graph and
replayed (one launch per token):

- sources are padded to a bucket (1, 2, 4, ..., 128; then multiples of 64): `S` source slots, `R = S * r` row slots
  for `r` rows per source, slot `s * r + j` always belonging to source slot `s`;
- the self-attention cache is one `[2 * layers, R, H, L, d]` buffer (`L`: prefix + new tokens, rounded up to
  `LENGTH_STEP`), written in place at the step's position (a device tensor, so replays need no new constants) and
  read over all `L` positions with a mask `position <= step`; BLIP's cross-attention keys/values of each source are
  copied once into `[S, H, N, d]` slots;
- rows that are finished, or whose source left, keep their slots and are fed `PAD_ID` (their logits are not read):
  the loop's logical rows are a map onto the slots (`rows`), so a source leaving costs nothing and a beam reorder is
  one `index_copy_` into the cache;
- prefixes (BLIP's `[DEC]` + prompt, OPT's query embeddings + prompt, shared heads included) run eagerly once per
  source, as in the eager steppers, and are then copied into the slots; OPT's left padding becomes a per-row mask of
  real positions and a per-row offset from cache position to position id.

The decoding loop (`generation.generate`) is the same for static and eager steppers, so greedy, beam and sampling
(drawn outside the graph, from the loop's generators) give the eager path's token ids, with scores equal to float
rounding (the masked attention over `L` positions sums in another order). Which path runs is the `decode` option
(`blip.tasks.options`): "eager", "static" (these steppers; CUDA graphs on CUDA) or "auto" (static on CUDA, eager
elsewhere).

Graphs are kept per model (BLIP's text decoder, BLIP-2's OPT) in a small LRU cache keyed by (row slots, source slots,
length, cross length, cross mask, dtype, thread); a capture that fails is logged with its reason and that key runs
the same static step uncaptured.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch
from torch import nn

from blip.models.bert import CrossKV, KVCache, TextDecoder
from blip.models.blip2.opt import OptForCausalLM
from blip.models.generation import DECODE_MODES, PAD_ID, CausalLmStepper, TextDecoderStepper

SOURCE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LARGE_BUCKET_STEP = 64  # beyond the last bucket: multiples of this
LENGTH_STEP = 32  # cache lengths rounded up to this: nearby prompt and answer lengths share a graph
GRAPH_CACHE_SIZE = 8  # graphs (and their buffers) kept per model: every bucket up to 128 at one length
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS handles, allocator, lazy inits)

_logger = logging.getLogger("blip.decode")

Replay = Callable[[], torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor]], Replay]


def source_bucket(sources: int) -> int:
    """The number of source slots for `sources` sources: the smallest bucket that holds them."""
    if sources < 1:
        raise ValueError(f"need at least one source, got {sources}")
    for bucket in SOURCE_BUCKETS:
        if sources <= bucket:
            return bucket
    return _round_up(sources, LARGE_BUCKET_STEP)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def uses_static(mode: str, device: torch.device) -> bool:
    """Whether `mode` ("auto" | "static" | "eager") decodes with the static stepper on `device`."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return mode == "static" or (mode == "auto" and device.type == "cuda")


def text_decoder_stepper(decoder: TextDecoder, cross: CrossKV, prefix_ids: list[int], mode: str):
    """The stepper for BLIP's text decoder that `mode` asks for on the decoder's device."""
    if uses_static(mode, cross.keys[0].device):
        return StaticTextDecoderStepper(decoder, cross, prefix_ids)
    return TextDecoderStepper(decoder, cross, prefix_ids)


def causal_lm_stepper(
    lm: OptForCausalLM,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    prefix_ids: list[list[int]],
    groups: SequenceOf[int] | None,
    mode: str,
):
    """The stepper for BLIP-2's OPT that `mode` asks for on the LM's device (arguments: `CausalLmStepper`'s)."""
    if uses_static(mode, embeds.device):
        return StaticCausalLmStepper(lm, embeds, mask, prefix_ids, groups)
    return CausalLmStepper(lm, embeds, mask, prefix_ids, groups)


# --- buffers and the step ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepKey:
    rows: int  # row slots R
    sources: int  # source slots S
    length: int  # cache positions L
    cross_length: int  # encoder positions N
    cross_masked: bool
    dtype: torch.dtype
    device: torch.device
    thread: int  # buffers are state: threads decoding at once on one model must not share them


@dataclass
class StepBuffers:
    """Everything the fixed-shape step reads or writes; addresses never change (a captured graph holds them)."""

    kv: torch.Tensor  # [2 * layers, R, H, L, d]: layer i's keys at 2i, values at 2i + 1
    tokens: torch.Tensor  # [R] long: each row slot's input token
    position: torch.Tensor  # [1] long: the cache position the step writes
    positions: torch.Tensor  # [L] long: 0 .. L - 1
    # BLIP's decoder: per layer [S, H, N, d] cross-attention keys/values; mask [S, 1, 1, N] (True = attend) or None
    cross_keys: list[torch.Tensor] = field(default_factory=list)
    cross_values: list[torch.Tensor] = field(default_factory=list)
    cross_mask: torch.Tensor | None = None
    # A left-padded causal LM (BLIP-2's OPT): which cached positions of each row are real, and the offset from the
    # cache position to the row's position id (its count of real tokens before it)
    real: torch.Tensor | None = None  # [R, L] bool
    row_offset: torch.Tensor | None = None  # [R] long

    @classmethod
    def allocate(cls, key: StepKey, layers: int, heads: int, head_dim: int, padded_rows: bool = False) -> StepBuffers:
        # zeros, not empty: masked positions and padded slots are read (weight 0), and 0 * NaN would be NaN
        dev, dtype = key.device, key.dtype
        buf = cls(
            kv=torch.zeros(2 * layers, key.rows, heads, key.length, head_dim, dtype=dtype, device=dev),
            tokens=torch.full((key.rows,), PAD_ID, dtype=torch.long, device=dev),
            position=torch.zeros(1, dtype=torch.long, device=dev),
            positions=torch.arange(key.length, device=dev),
        )
        if key.cross_length:
            cross_shape = (key.sources, heads, key.cross_length, head_dim)
            buf.cross_keys = [torch.zeros(cross_shape, dtype=dtype, device=dev) for _ in range(layers)]
            buf.cross_values = [torch.zeros(cross_shape, dtype=dtype, device=dev) for _ in range(layers)]
            if key.cross_masked:
                buf.cross_mask = torch.ones(key.sources, 1, 1, key.cross_length, dtype=torch.bool, device=dev)
        if padded_rows:
            buf.real = torch.ones(key.rows, key.length, dtype=torch.bool, device=dev)
            buf.row_offset = torch.zeros(key.rows, dtype=torch.long, device=dev)
        return buf


class StaticKV:
    """`KVCache.append`'s interface over the static buffer, for the models' own layers: the new position's keys and
    values written in place at `position` (a device tensor), all `L` positions returned (the caller masks)."""

    def __init__(self, kv: torch.Tensor, position: torch.Tensor):
        self.kv, self.position = kv, position

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv[2 * layer], self.kv[2 * layer + 1]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        return keys, values

    def advance(self, length: int) -> None:
        """Nothing: the stepper moves `position` itself (`OptDecoder.run` calls this after its layers)."""


def decoder_step(decoder: TextDecoder, buf: StepBuffers) -> torch.Tensor:
    """One token for every row slot of BLIP's text decoder: reads `buf.tokens` at `buf.position`, writes that
    position's keys/values into `buf.kv`, returns next-token logits `[R, V]`. Fixed shapes only, no host reads:
    capturable as a CUDA graph. `TextDecoder.forward` over a `KVCache` with one new token, through the same layers,
    except that attention runs over all `L` cached positions with the later ones masked."""
    bert = decoder.bert
    emb = bert.embeddings
    x = emb.word_embeddings(buf.tokens[:, None]) + emb.position_embeddings(buf.position)  # (R, 1, D)
    x = emb.dropout(emb.LayerNorm(x))
    visible = (buf.positions <= buf.position).view(1, 1, 1, -1)  # (1, 1, 1, L)
    cross = CrossKV(buf.cross_keys, buf.cross_values, buf.cross_mask)
    cache = StaticKV(buf.kv, buf.position)
    for i, layer in enumerate(bert.layers):
        x = layer(x, visible, True, cross, cache, i)
    return decoder.cls.predictions(x[:, -1])


def causal_lm_step(lm: OptForCausalLM, buf: StepBuffers) -> torch.Tensor:
    """One token for every row slot of BLIP-2's OPT (`OptDecoder.run` for one new position, fixed shapes):
    position ids and the attention mask come from `buf.real` / `buf.row_offset` instead of a mask's cumulative sum."""
    decoder = lm.model.decoder
    positions = (buf.row_offset + buf.position)[:, None]  # (R, 1)
    visible = (buf.real & (buf.positions <= buf.position))[:, None, None, :]  # (R, 1, 1, L)
    x = decoder.run(decoder.embed_tokens(buf.tokens[:, None]), positions, visible, StaticKV(buf.kv, buf.position))
    return lm.lm_head(x[:, -1])


# --- CUDA graphs ------------------------------------------------------------------------------------------------------


def capture_cuda_graph(step: Callable[[], torch.Tensor]) -> Replay:
    """`step` captured as a CUDA graph after warm-up runs on a side stream; the replay returns the graph's output
    tensor (overwritten by the next replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA meanwhile
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


@dataclass
class GraphEntry:
    buffers: StepBuffers
    replay: Replay | None = None  # None until captured
    failed: str | None = None  # why capture failed: this key then runs uncaptured


class GraphCache:
    """Per decoder: the step's buffers and captured graph per `StepKey`, least recently used dropped beyond
    `capacity`. `capture` makes a replay from a step function (`capture_cuda_graph`; tests pass a fake)."""

    def __init__(self, capacity: int = GRAPH_CACHE_SIZE, capture: Capture = capture_cuda_graph):
        self.capacity, self.capture = capacity, capture
        self.entries: OrderedDict[StepKey, GraphEntry] = OrderedDict()
        self.captures = 0  # successful captures so far

    def entry(self, key: StepKey, allocate: Callable[[], StepBuffers]) -> GraphEntry:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        while len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        entry = self.entries[key] = GraphEntry(allocate())
        return entry

    def run(self, key: StepKey, entry: GraphEntry, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One step for `entry`: its graph replayed (captured on first use), or `step` itself if capture failed."""
        if entry.replay is None and entry.failed is None:
            try:
                with torch.cuda.device(key.device) if key.device.type == "cuda" else contextlib.nullcontext():
                    entry.replay = self.capture(step)
                self.captures += 1
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the same step, uncaptured
                entry.failed = f"{type(e).__name__}: {e}".splitlines()[0]
                _logger.warning("CUDA graph capture failed for %s, decoding uncaptured: %s", key, entry.failed)
        if entry.replay is not None:
            return entry.replay()
        return step()


_graph_caches: weakref.WeakKeyDictionary[TextDecoder, GraphCache] = weakref.WeakKeyDictionary()


def graph_cache(decoder: TextDecoder) -> GraphCache:
    """The decoder's own graph cache (dropped with the decoder; entries hold no reference to it)."""
    cache = _graph_caches.get(decoder)
    if cache is None:
        cache = _graph_caches[decoder] = GraphCache()
    return cache


def clear_graph_caches() -> None:
    """Drop every captured graph and its buffers (frees their device memory)."""
    _graph_caches.clear()


# --- the stepper ------------------------------------------------------------------------------------------------------


class _SlotStepper:
    """What both static steppers share: logical rows mapped onto fixed row slots, the step run as a graph or not.

    `graphs`: where captured graphs live; default: the model's own cache on CUDA, none (uncaptured) elsewhere. A
    `GraphCache` given on the CPU is used as on CUDA (tests pass one with a fake capture)."""

    prefix_ids: list[list[int]]
    fixed_shape = True  # tells the loop that rows leaving saves nothing (greedy then skips that bookkeeping)

    def __init__(self, model: nn.Module, device: torch.device, graphs: GraphCache | None):
        self.model = model
        self.graphs = graphs if graphs is not None else (graph_cache(model) if device.type == "cuda" else None)
        self.key: StepKey | None = None
        self.entry: GraphEntry | None = None
        self.rows = torch.empty(0, dtype=torch.long)  # logical row -> row slot
        self.active_sources = 0
        self.length = 0  # cache positions filled

    @property
    def buffers(self) -> StepBuffers:
        assert self.entry is not None, "start() first"
        return self.entry.buffers

    def _buffers_for(self, key: StepKey, allocate: Callable[[], StepBuffers]) -> StepBuffers:
        self.key = key
        self.entry = self.graphs.entry(key, allocate) if self.graphs is not None else GraphEntry(allocate())
        return self.entry.buffers

    def _fill_prefix(self, cache: KVCache, rows: int, repeat: int) -> None:
        """Row slots `[0, rows)` take `cache`'s filled positions, each cache row repeated `repeat` times (a row per
        source, or already a row per slot)."""
        kv, filled = self.buffers.kv, cache.length
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            kv[2 * i, :rows, :, :filled] = k[:, :, :filled].repeat_interleave(repeat, dim=0)
            kv[2 * i + 1, :rows, :, :filled] = v[:, :, :filled].repeat_interleave(repeat, dim=0)
        self.rows = torch.arange(rows, device=kv.device)
        self.active_sources = len(self.prefix_ids)
        self.length = filled

    def _step(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        buf = self.buffers
        buf.tokens.fill_(PAD_ID)
        buf.tokens.index_copy_(0, self.rows, tokens)
        buf.position.fill_(self.length)
        if self.graphs is not None:
            logits = self.graphs.run(self.key, self.entry, self._step)
        else:
            logits = self._step()
        self.length += 1
        return logits.index_select(0, self.rows)  # a copy: the graph's output is overwritten by the next replay

    def select(self, rows: torch.Tensor, sources: torch.Tensor | None) -> None:
        """New logical row `i` takes over the slot of the row at its place (the same source, the same rank within
        it); its cache becomes that of old row `rows[i]`: copied only where they differ (beam reordering). Rows
        stay in their source's slots, so per-source state (cross-attention, prefix masks) never moves."""
        per_source = self.rows.shape[0] // self.active_sources
        if sources is None:
            place = torch.arange(rows.shape[0], device=rows.device)
        else:
            within = torch.arange(per_source, device=rows.device)
            place = (sources[:, None] * per_source + within).reshape(-1)
            self.active_sources = sources.shape[0]
        dest, src = self.rows[place], self.rows[rows]
        if not torch.equal(dest, src):
            filled = self.buffers.kv[:, :, :, : self.length]
            filled.index_copy_(1, dest, filled.index_select(1, src))
        self.rows = dest


class StaticTextDecoderStepper(_SlotStepper):
    """`generation.TextDecoderStepper` with fixed shapes: the same prefix and results, a static cache and slots."""

    def __init__(self, decoder: TextDecoder, cross: CrossKV, prefix_ids: list[int], graphs: GraphCache | None = None):
        if cross.index is not None:
            raise ValueError("generation needs grouped cross-attention states (no row index)")
        if cross.probe is not None:
            raise ValueError("static decoding keeps no attention probabilities (use the eager stepper)")
        super().__init__(decoder, cross.keys[0].device, graphs)
        self.decoder, self.cross = decoder, cross
        self.prefix_ids = [list(prefix_ids)] * cross.keys[0].shape[0]

    def start(self, rows_per_source: int, max_new_tokens: int) -> torch.Tensor:
        num_sources, prefix = len(self.prefix_ids), self.prefix_ids[0]
        keys0 = self.cross.keys[0]
        device, (_, heads, cross_length, head_dim) = keys0.device, keys0.shape
        slots = source_bucket(num_sources)
        layers = len(self.decoder.bert.layers)
        key = StepKey(
            rows=slots * rows_per_source,
            sources=slots,
            length=_round_up(len(prefix) + max_new_tokens, LENGTH_STEP),
            cross_length=cross_length,
            cross_masked=self.cross.mask is not None,
            dtype=keys0.dtype,
            device=device,
            thread=threading.get_ident(),
        )
        buf = self._buffers_for(key, lambda: StepBuffers.allocate(key, layers, heads, head_dim))
        for i in range(layers):  # this call's sources into their slots (stale slots beyond are finite, unread)
            buf.cross_keys[i][:num_sources].copy_(self.cross.keys[i])
            buf.cross_values[i][:num_sources].copy_(self.cross.values[i])
        if buf.cross_mask is not None:
            buf.cross_mask.fill_(True)
            buf.cross_mask[:num_sources].copy_(self.cross.mask)

        # The prefix runs eagerly once per source (as the eager stepper does), then fills each source's row slots.
        cache = KVCache(layers, len(prefix))
        ids = torch.tensor(prefix, dtype=torch.long, device=device).expand(num_sources, -1)
        logits = self.decoder(ids, cross=self.cross, cache=cache, last_only=True)
        self._fill_prefix(cache, num_sources * rows_per_source, rows_per_source)
        self.cross = None  # the buffers hold it now
        return logits

    def _step(self) -> torch.Tensor:
        return decoder_step(self.decoder, self.buffers)


class StaticCausalLmStepper(_SlotStepper):
    """`generation.CausalLmStepper` (BLIP-2's OPT) with fixed shapes: the prefixes run eagerly as there (shared
    group heads included), their keys/values, padding mask and position offsets are then written into the slots
    once; every new token is one fixed-shape step. The cache length is rounded up to `LENGTH_STEP` so that prompts of
    nearby lengths share a graph."""

    def __init__(
        self,
        lm: OptForCausalLM,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        prefix_ids: list[list[int]],
        groups: SequenceOf[int] | None = None,
        graphs: GraphCache | None = None,
    ):
        super().__init__(lm, embeds.device, graphs)
        self.lm = lm
        self.eager = CausalLmStepper(lm, embeds, mask, prefix_ids, groups)
        self.prefix_ids = self.eager.prefix_ids

    def start(self, rows_per_source: int, max_new_tokens: int) -> torch.Tensor:
        logits = self.eager.prefill(max_new_tokens)  # one cache row per source: copied once, into the slots
        cache = self.eager.cache
        mask = self.eager.mask.bool().repeat_interleave(rows_per_source, dim=0)  # (E * r, prefix + new): 1 = real
        self.eager = None  # its cache is copied below, then dropped
        rows, length = mask.shape
        keys0 = next(k for k in cache.keys if k is not None)
        slots = source_bucket(len(self.prefix_ids))
        key = StepKey(
            rows=slots * rows_per_source,
            sources=slots,
            length=_round_up(length, LENGTH_STEP),
            cross_length=0,
            cross_masked=False,
            dtype=keys0.dtype,
            device=keys0.device,
            thread=threading.get_ident(),
        )
        layers, heads, head_dim = len(cache.keys), keys0.shape[1], keys0.shape[3]
        buf = self._buffers_for(key, lambda: StepBuffers.allocate(key, layers, heads, head_dim, padded_rows=True))
        buf.real.fill_(True)  # padded slots and positions past the prefix: real (never an empty softmax row)
        buf.real[:rows, :length] = mask
        filled = cache.length
        buf.row_offset.zero_()
        buf.row_offset[:rows] = mask[:, :filled].sum(1) - filled  # position id = real tokens before the position
        self._fill_prefix(cache, rows, rows_per_source)
        return logits

    def _step(self) -> torch.Tensor:
        return causal_lm_step(self.lm, self.buffers)
