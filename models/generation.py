"""Generation shared by the decoder families: static KV cache, logits processors, greedy and
sampling decode, and the CUDA-graph step.

Semantics follow transformers' `generate` (argument names, defaults, processor formulas and
order, the returned prompt + new tokens, finished rows padded with pad_token_id, beam search's
vectorised algorithm with its length penalty and early-stopping rules), so greedy and beam
decoding give transformers' ids on the same checkpoint, left-padded batches included.

Design (gpt-fast's static cache, extended to left padding):
  - one StaticKVCache per call (or per captured session): k/v (B, Lmax, H, D) per layer, plus
    `seqlens` (B,) int32 -- slots filled -- and `leftpad` (B,) int32 -- each row's left padding,
    which fl.attention_with_kvcache skips;
  - every per-step quantity lives on the device (the token buffer, the write index, the step
    counter, the unfinished flags), and every processor is a fixed-shape tensor program over the
    whole token buffer, so one step has fixed shapes and addresses: it is captured once per
    (batch, Lmax, settings) as a CUDA graph and replayed. The host reads the device only to stop
    early, every `sync_every` tokens, and at the end.
  - beam search keeps transformers' fixed-shape formulation (running and finished hypotheses as
    (B, num_beams, T) tensors, top-2k continuations) with the step index on the device; after the
    search is over, further steps are no-ops (every update is gated by a sticky `done` flag), so
    the host may check for the end only every few steps. The KV cache is paged (one slot per
    page, fl.attention_with_kvcache's block_table): the surviving beams take their parents'
    history by a gather of the (rows, Lmax) int32 page table, inside the graph, and no layer's
    K/V is copied (on CUDA; see _page_beams).
  - sampling draws with the exponential race (argmax p / E, E ~ Exp(1)): one fixed-shape kernel
    that CUDA graphs capture, distributed exactly as multinomial(p); reproducible under
    torch.manual_seed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from fastlayers.backends import requested

GENERATION_CONFIG_NAME = "generation_config.json"


class StaticKVCache:
    """Per-layer k/v caches (B, Lmax, H, D) with the rows' fill lengths and left padding (int32, (B,)).

    Paged mode (beam search, `use_pages()`): the same storage read as pages of one slot,
    (B * Lmax, 1, H, D), through `block_table` (B, Lmax) int32, flash-attn's paged-cache convention:
    row r's slot j is page block_table[r, j]. Row r writes its new tokens into its own pages (r, j);
    beams that share a history share its pages, so `reorder` rewrites the (B, Lmax) table instead of
    copying every layer's cache."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, max_len, num_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.leftpad = torch.zeros(batch, dtype=torch.int32, device=device)
        self.batch, self.max_len = batch, max_len
        self.block_table: Optional[Tensor] = None      # paged mode: (B, Lmax) int32 page of each slot

    def use_pages(self) -> None:
        """Switch to paged mode with every row on its own pages (idempotent, before a generation)."""
        if self.block_table is None:
            dev = self.seqlens.device
            self._own_pages = torch.arange(self.batch * self.max_len, dtype=torch.int32, device=dev).view(
                self.batch, self.max_len)                                          # (B, Lmax): page (r, j)
            self._slots = torch.arange(self.max_len, device=dev)
            self.block_table = self._own_pages.clone()

    def reset_pages(self) -> None:
        """Every row back on its own pages (a new generation in a reused cache)."""
        if self.block_table is not None:
            self.block_table.copy_(self._own_pages)

    def kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s (k, v) as fl.attention_with_kvcache takes them with `block_table`: (B, Lmax,
        H, D), or in paged mode the same memory as (B * Lmax, 1, H, D) pages."""
        k, v = self.k[layer], self.v[layer]
        if self.block_table is None:
            return k, v
        return k.view(-1, 1, *k.shape[2:]), v.view(-1, 1, *v.shape[2:])

    def reorder(self, rows: Tensor) -> None:
        """Row i takes old row rows[i]'s history (beam search), in place, fixed shapes. Paged: the
        table rows of the filled slots are gathered (B x Lmax int32), the slots to come stay row i's
        own pages (each page is written once, by its own row); else every layer's cache is copied."""
        if self.block_table is not None:
            filled = self._slots[None, :] < self.seqlens.index_select(0, rows).long()[:, None]   # (B, Lmax)
            self.block_table.copy_(torch.where(filled, self.block_table.index_select(0, rows), self._own_pages))
            return
        for t in self.k + self.v:
            t.copy_(t.index_select(0, rows))


def _page_beams(device: torch.device) -> bool:
    """Whether beam search reads a paged cache (StaticKVCache.use_pages): where the decode kernels
    read pages in place (CUDA). On CPU the torch backend gathers the pages on every call, which costs
    more than the per-step copy it saves (bart d256 x 3 layers, beam 4, 64 + 64 tokens, 1 thread:
    934 ms paged vs 830 ms copying); there the reorder copies the caches."""
    return device.type == "cuda"


# ---------------------------------------------------------------------------------------- config
@dataclass
class GenerationConfig:
    """transformers' GenerationConfig fields that fastlayers implements (same names and defaults)."""
    max_length: Optional[int] = None        # None: 20 new tokens (transformers 5's default)
    max_new_tokens: Optional[int] = None
    min_length: int = 0
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Any = False              # True | False | "never"
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Any = None
    output_scores: bool = False
    return_dict_in_generate: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = cls.field_names()
        # null = the default where None is not a value (transformers 5 writes unset fields as null)
        return cls(**{k: v for k, v in d.items() if k in names and not (v is None and k in _NOT_NONE)},
                   extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """As transformers: every generation field the model config sets (not None) is taken."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return cls(**{k: v for k, v in d.items() if k in cls.field_names() and v is not None})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    def updated(self, **kwargs) -> "GenerationConfig":
        unknown = sorted(set(kwargs) - self.field_names())
        if unknown:
            raise TypeError(f"generate: unknown argument(s) {unknown}; supported: {sorted(self.field_names())} "
                            "plus attention_mask, streamer, use_cuda_graph, sync_every")
        # a None kwarg leaves a field that cannot be None as configured (an unset transformers kwarg)
        return dataclasses.replace(self, **{k: v for k, v in kwargs.items() if not (v is None and k in _NOT_NONE)})

    @staticmethod
    def _ids(e) -> list:
        return [] if e is None else ([int(e)] if isinstance(e, int) else [int(x) for x in e])

    @property
    def eos_ids(self) -> list:
        return self._ids(self.eos_token_id)

    def validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"{name}: expected {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            bad("max_new_tokens", "an int >= 1")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 0):
            bad("max_length", "an int >= 0 or None")
        for name in ("min_length", "no_repeat_ngram_size", "top_k"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an int >= 0")
        if self.min_new_tokens is not None and (not is_int(self.min_new_tokens) or self.min_new_tokens < 0):
            bad("min_new_tokens", "an int >= 0")
        for name in ("num_return_sequences", "num_beams"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        if self.do_sample and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad("temperature", "a float > 0 (strictly positive) with do_sample=True")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            bad("top_p", "a float in (0, 1]")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a float > 0")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            bad("length_penalty", "a float")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", "True, False or 'never'")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            raise ValueError(f"num_return_sequences: greedy decoding returns one sequence per prompt; got "
                             f"{self.num_return_sequences} without do_sample=True or num_beams > 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences: at most num_beams={self.num_beams}, got {self.num_return_sequences}")


# the fields whose None means "the default": every field whose default is not None
_NOT_NONE = frozenset(f.name for f in dataclasses.fields(GenerationConfig)
                      if f.name != "extra" and f.default is not None)


def load_generation_config(model_dir, model_config) -> GenerationConfig:
    """generation_config.json of the folder when present, else the model config's generation fields."""
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    if path.is_file():
        return GenerationConfig.from_dict(json.loads(path.read_text()))
    return GenerationConfig.from_model_config(model_config)


# ---------------------------------------------------------------------------------------- processors
def top_k_filter(scores: Tensor, top_k: int, min_tokens_to_keep: int = 1) -> Tensor:
    """transformers' TopKLogitsWarper: keep the top_k largest scores (ties at the k-th kept), -inf elsewhere."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, top_p: float, min_tokens_to_keep: int = 1) -> Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose cumulative probability is at
    most 1 - top_p (sorted ascending), always keeping the min_tokens_to_keep most likely."""
    sorted_scores, idx = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))


def sample_from_scores(scores: Tensor) -> Tensor:
    """One token per row drawn from softmax(scores) by the exponential race: argmax(p / E),
    E ~ Exp(1) i.i.d. -- exactly the categorical distribution, in fixed-shape kernels."""
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(-1)


def sample_without_replacement(scores: Tensor, k: int) -> Tensor:
    """k distinct indices per row drawn from softmax(scores) without replacement (successive draws,
    as torch.multinomial(replacement=False)): top-k of p / E, E ~ Exp(1) (Gumbel-top-k)."""
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return torch.topk(probs / race, k, dim=-1).indices


class _Settings:
    """Everything a step bakes in (a captured graph's key), resolved from a GenerationConfig."""

    def __init__(self, gc: GenerationConfig, prompt_len: int, max_len: int, vocab: int, device):
        self.do_sample = bool(gc.do_sample)
        self.temperature = float(gc.temperature)
        self.top_k = int(gc.top_k) if gc.do_sample else 0
        self.top_p = float(gc.top_p) if gc.do_sample else 1.0
        self.repetition_penalty = float(gc.repetition_penalty)
        self.ngram = int(gc.no_repeat_ngram_size)
        # as transformers (_prepare_generated_length): min_new_tokens, when set, takes precedence and
        # replaces min_length by min_new_tokens + the (decoder) prompt length
        self.min_length = int(gc.min_length) if gc.min_new_tokens is None else int(gc.min_new_tokens) + prompt_len
        self.min_new = int(gc.min_new_tokens or 0)
        self.prompt_len, self.max_len = prompt_len, max_len       # max_len: prompt + new tokens
        self.eos = [e for e in gc.eos_ids if 0 <= e < vocab]
        self.num_beams = int(gc.num_beams)
        self.length_penalty = float(gc.length_penalty)
        self.early_stopping = gc.early_stopping
        self.forced_bos = gc.forced_bos_token_id
        self.forced_eos = [e for e in GenerationConfig._ids(gc.forced_eos_token_id) if 0 <= e < vocab]
        pad = gc.pad_token_id if gc.pad_token_id is not None else (gc.eos_ids[0] if gc.eos_ids else 0)
        self.pad = int(pad)
        # beam search fills unwritten slots as transformers does: `pad_token_id or eos_token_id[0]`
        self.beam_fill = gc.pad_token_id if gc.pad_token_id else (gc.eos_ids[0] if gc.eos_ids else -1)
        self.min_tokens_to_keep = (len(self.eos) + 1) if self.num_beams > 1 else 1
        self.eos_t = torch.tensor(self.eos, dtype=torch.long, device=device)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.eos_mask[self.eos_t] = True
        self.forced_eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.forced_eos_mask[torch.tensor(self.forced_eos, dtype=torch.long, device=device)] = True

    def key(self):
        return (self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.ngram,
                self.min_length, self.min_new, self.prompt_len, self.max_len, tuple(self.eos), self.pad,
                self.num_beams, self.length_penalty, self.early_stopping, self.forced_bos, tuple(self.forced_eos))


def _process(scores: Tensor, tokens: Tensor, cur: Tensor, s: _Settings, leftpad: Tensor) -> Tensor:
    """transformers' processors in its order over the rows' token buffers (valid slots < cur):
    repetition penalty, no-repeat n-gram, min length, min new tokens, forced BOS, forced EOS, then
    (sampling) temperature, top-k, top-p. scores (N, V) float32, tokens (N, T) int64."""
    N, V = scores.shape
    T = tokens.shape[1]
    slot = torch.arange(T, device=scores.device)[None, :]
    valid = slot < cur                                                                     # (1, T)
    toks = tokens.clamp(min=0)                                                             # unwritten slots may hold -1
    ninf = float("-inf")
    if s.repetition_penalty != 1.0:
        # each row's left padding is not a token it saw (transformers: prompt_ignore_length = padding)
        seen = valid & (slot >= leftpad.long()[:, None])                                       # (N, T)
        present = torch.zeros_like(scores).scatter_reduce_(1, toks, seen.to(scores.dtype), "amax")
        pen = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
        scores = torch.where(present > 0, pen, scores)
    n = s.ngram
    if n > 0 and T >= n:
        win = toks.unfold(1, n, 1)                                                          # (N, T-n+1, n)
        j = torch.arange(win.shape[1], device=scores.device)
        last_pos = (cur - (n - 1) + torch.arange(n - 1, device=scores.device)).clamp(0, T - 1)
        last = toks[:, last_pos]                                                            # (N, n-1)
        match = (win[..., : n - 1] == last[:, None, :]).all(-1) & (j + n <= cur)[None]
        banned = torch.zeros_like(scores).scatter_reduce_(1, win[..., n - 1], match.to(scores.dtype), "amax")
        scores = scores.masked_fill(banned > 0, ninf)
    if s.eos and s.min_length > 0:
        scores = scores.masked_fill(s.eos_mask[None, :] & (cur < s.min_length), ninf)
    if s.eos and s.min_new > 0:
        scores = scores.masked_fill(s.eos_mask[None, :] & (cur - s.prompt_len < s.min_new), ninf)
    if s.forced_bos is not None:
        only = torch.full_like(scores, ninf)
        only[:, s.forced_bos] = 0.0
        scores = torch.where(cur == 1, only, scores)
    if s.forced_eos:
        only = torch.zeros_like(scores).masked_fill(~s.forced_eos_mask[None, :], ninf)
        scores = torch.where(cur == s.max_len - 1, only, scores)
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k > 0:
            scores = top_k_filter(scores, s.top_k, s.min_tokens_to_keep)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p, s.min_tokens_to_keep)
    return scores


# ---------------------------------------------------------------------------------------- state
class _DecodeState:
    """The device-side state of one generation (all fixed shapes): rows N = batch * expansion."""

    def __init__(self, cache, rows: int, total_len: int, device):
        self.cache = cache
        self.tokens = torch.zeros(rows, total_len, dtype=torch.long, device=device)   # (running) sequences
        self.cur = torch.zeros((), dtype=torch.long, device=device)       # where the next token goes
        self.alive_steps = torch.zeros((), dtype=torch.long, device=device)
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.next_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.graph = None
        self.beams = None
        self.settings: Optional[_Settings] = None      # whose tensors (eos ids, masks) a captured graph reads

    def reset(self, prompt: Tensor, real: Tensor, s: _Settings) -> None:
        P = prompt.shape[1]
        self.tokens.fill_(s.beam_fill if s.num_beams > 1 else s.pad)
        self.tokens[:, :P] = prompt
        self.cur.fill_(P)
        self.alive_steps.zero_()
        self.unfinished.fill_(True)
        self.done.fill_(False)
        self.next_ids.copy_(prompt[:, -1:])
        self.positions.copy_((real - 1)[:, None])
        self.cache.leftpad.copy_(P - real)
        self.cache.seqlens.zero_()
        self.cache.reset_pages()
        if s.num_beams > 1:
            self.beams = self.beams or _BeamState(self.tokens.shape[0] // s.num_beams, s.num_beams,
                                                  self.tokens.shape[1], len(s.eos), self.tokens.device)
            self.beams.reset(self.tokens, s)


class _BeamState:
    """transformers' beam search tensors: finished hypotheses and running beams' scores/indices."""

    def __init__(self, batch: int, num_beams: int, T: int, n_eos: int, device):
        self.B, self.nb = batch, num_beams
        self.k = max(2, 1 + n_eos) * num_beams                                  # continuations kept per step
        self.sequences = torch.zeros(batch, num_beams, T, dtype=torch.long, device=device)
        self.beam_scores = torch.zeros(batch, num_beams, device=device)
        self.running_scores = torch.zeros(batch, num_beams, device=device)
        self.is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
        self.heuristic_unsatisfied = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self.running_indices = torch.zeros(batch, num_beams, T, dtype=torch.int32, device=device)
        self.beam_indices = torch.zeros(batch, num_beams, T, dtype=torch.int32, device=device)
        self.top_mask = torch.arange(self.k, device=device) < num_beams                 # (k,)

    def reset(self, tokens: Tensor, s: _Settings) -> None:
        self.sequences.copy_(tokens.view(self.B, self.nb, -1))
        self.running_scores.zero_()
        self.running_scores[:, 1:] = -1e9
        self.beam_scores.fill_(-1e9)
        self.is_finished.fill_(False)
        self.heuristic_unsatisfied.fill_(True)
        self.running_indices.fill_(-1)
        self.beam_indices.fill_(-1)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """t (B, n, ...) rows picked by idx (B, m) along dim 1 (transformers' _gather_beams)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _commit(done: Tensor, pairs) -> None:
    """dst <- new unless the search is already over (extra steps after the end are no-ops)."""
    for dst, new in pairs:
        dst.copy_(torch.where(done, dst, new))


def _advance(logits: Tensor, st: _DecodeState, s: _Settings) -> None:
    """Greedy / sampling: each row's next token from logits (N, V); the state updated in place."""
    scores = _process(logits.float(), st.tokens, st.cur, s, st.cache.leftpad)
    tok = sample_from_scores(scores) if s.do_sample else scores.argmax(-1)                 # (N,)
    alive = st.unfinished.any()
    tok = torch.where(st.unfinished, tok, torch.full_like(tok, s.pad))
    st.tokens.scatter_(1, st.cur.view(1, 1).expand(tok.shape[0], 1), tok[:, None])
    if s.eos:
        st.unfinished &= ~(tok[:, None] == s.eos_t[None, :]).any(-1)
    st.alive_steps += alive.to(torch.long)
    st.done.copy_(~st.unfinished.any())
    st.cur += 1
    st.next_ids.copy_(tok[:, None])
    st.positions += 1


def _beam_advance(logits: Tensor, st: _DecodeState, s: _Settings) -> None:
    """One step of transformers' vectorised beam search (utils.GenerationMixin._beam_search), with
    the step index on the device and every update gated by the sticky `done` flag."""
    bs = st.beams
    B, nb, T = bs.B, bs.nb, st.tokens.shape[1]
    V = logits.shape[-1]
    cur, P, done = st.cur, s.prompt_len, st.done
    log_probs = _process(torch.log_softmax(logits.float(), -1), st.tokens, cur, s, st.cache.leftpad)  # (N, V)
    log_probs = (log_probs.view(B, nb, V) + bs.running_scores[:, :, None]).reshape(B, nb * V)
    if s.do_sample:
        idx = sample_without_replacement(log_probs, bs.k)
        top_lp = log_probs.gather(1, idx)
        top_lp, order = top_lp.sort(dim=-1, descending=True)
        idx = idx.gather(1, order)
    else:
        top_lp, idx = torch.topk(log_probs, bs.k)                                           # (B, k)
    parent = idx // V                                                                        # (B, k)
    top_ids = idx % V
    running = st.tokens.view(B, nb, T)
    top_seqs = _gather(running, parent)                                                      # (B, k, T)
    col = cur.view(1, 1, 1).expand(B, bs.k, 1)
    top_seqs.scatter_(2, col, top_ids[:, :, None])
    flat_parent = (parent + torch.arange(B, device=idx.device)[:, None] * nb).to(torch.int32)
    top_rindices = _gather(bs.running_indices, parent)
    top_rindices.scatter_(2, (cur - P).view(1, 1, 1).expand(B, bs.k, 1), flat_parent[:, :, None])
    # stopping criteria on the continued sequences: the new token is an eos, or the length is reached
    hits = (top_ids[:, :, None] == s.eos_t).any(-1) if s.eos else torch.zeros_like(top_ids, dtype=torch.bool)
    hits = hits | (cur + 1 >= s.max_len)
    # running beams for the next step: the best continuations that did not stop
    run_lp = top_lp + hits.to(torch.float32) * -1.0e9
    nxt = torch.topk(run_lp, nb).indices                                                     # (B, nb)
    new_running = _gather(top_seqs, nxt)
    new_running_scores = _gather(run_lp, nxt)
    new_running_indices = _gather(top_rindices, nxt)
    # finished hypotheses: merge the continuations that just stopped among the top num_beams
    just = hits & bs.top_mask[None, :]
    fin_lp = top_lp / ((cur + 1 - P).to(torch.float32) ** s.length_penalty)
    if s.early_stopping is True:
        fin_lp = fin_lp + bs.is_finished.all(-1, keepdim=True).to(torch.float32) * -1.0e9
    fin_lp = fin_lp + (~bs.heuristic_unsatisfied).to(torch.float32) * -1.0e9
    fin_lp = fin_lp + (~just).to(torch.float32) * -1.0e9
    m_seqs = torch.cat((bs.sequences, top_seqs), 1)
    m_scores = torch.cat((bs.beam_scores, fin_lp), 1)
    m_indices = torch.cat((bs.beam_indices, top_rindices), 1)
    m_fin = torch.cat((bs.is_finished, just), 1)
    best = torch.topk(m_scores, nb).indices
    new_seqs, new_scores = _gather(m_seqs, best), _gather(m_scores, best)
    new_indices, new_fin = _gather(m_indices, best), _gather(m_fin, best)
    # the cache follows the surviving beams (identity once the search is over)
    rows = new_running_indices.gather(2, (cur - P).view(1, 1, 1).expand(B, nb, 1))          # (B, nb, 1) flat parents
    rows = torch.where(done, torch.arange(B * nb, device=rows.device), rows.reshape(-1).long())
    st.cache.reorder(rows)
    # early-stop heuristic with the new length
    cur1 = cur + 1
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_len = torch.full_like(cur, s.max_len - P)
    else:
        best_len = cur1 - P
    best_possible = new_running_scores[:, :1] / (best_len.to(torch.float32) ** s.length_penalty)
    worst = torch.where(new_fin, new_scores.min(1, keepdim=True).values, torch.full_like(new_scores, -1.0e9))
    new_heur = bs.heuristic_unsatisfied & (best_possible > worst).any(-1, keepdim=True)
    unfinished = new_heur.any() & ~hits.all()
    if s.early_stopping is True:             # (a Python constant: nothing is copied to the device in a graph)
        unfinished = unfinished & ~new_fin.all()
    _commit(done, ((st.tokens, new_running.reshape(B * nb, T)), (bs.running_scores, new_running_scores),
                   (bs.running_indices, new_running_indices), (bs.sequences, new_seqs), (bs.beam_scores, new_scores),
                   (bs.beam_indices, new_indices), (bs.is_finished, new_fin), (bs.heuristic_unsatisfied, new_heur)))
    st.next_ids.copy_(new_running.reshape(B * nb, T).gather(1, cur.view(1, 1).expand(B * nb, 1)))
    st.done |= ~unfinished
    st.cur += 1
    st.positions += 1


# ---------------------------------------------------------------------------------------- generate
@dataclass
class GenerateOutput:
    """generate(return_dict_in_generate=True): `sequences` as returned otherwise, and with
    output_scores the beams' `sequences_scores` (length-penalised sum of log-probabilities, as
    transformers) or, for greedy/sampling, `scores`: one (N, V) tensor of processed scores per step."""
    sequences: Tensor
    sequences_scores: Optional[Tensor] = None
    scores: Optional[tuple] = None


class GenerationMixin:
    """generate() for models implementing the generation hooks:
    decoder-only: `_new_cache(rows, max_len)`, `_prefill(input_ids, attention_mask, position_ids, cache)
    -> logits (N, V)`, `_decode_step(input_ids (N, 1), position_ids (N, 1), cache) -> logits (N, V)`,
    `max_positions`; encoder-decoder (`is_encoder_decoder = True`) also `_encode(input_ids,
    attention_mask)`, `_new_cache(rows, max_len, encoder_len=, num_beams=)` and
    `_prefill_cross(encoder_hidden, attention_mask, cache)`."""

    generation_config: Optional[GenerationConfig] = None
    is_encoder_decoder = False

    def _generation_defaults(self) -> GenerationConfig:
        if self.generation_config is None:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        return self.generation_config

    def _vocab_size(self) -> int:
        return self.config.vocab_size

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 generation_config: Optional[GenerationConfig] = None, streamer=None,
                 use_cuda_graph: Optional[bool] = None, sync_every: int = 16, **kwargs):
        """Greedy, sampled or beam-search continuation of a batch, as transformers' `generate`.

        input_ids: (B, P) int64 -- prompts (decoder-only models: left-padded when their lengths
        differ) or encoder inputs (encoder-decoder models, any padding); attention_mask: (B, P),
        1 = token, 0 = padding (None: inferred from pad_token_id as transformers does).
        kwargs: GenerationConfig fields -- max_new_tokens, max_length, min_new_tokens, min_length,
        do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, num_beams,
        length_penalty, early_stopping (True/False/"never"), eos_token_id (int or list),
        pad_token_id, decoder_start_token_id, forced_bos_token_id, forced_eos_token_id,
        num_return_sequences, output_scores, return_dict_in_generate; defaults from the folder's
        generation_config.json, else the model config, else transformers' defaults.
        streamer: an object with put(tokens)/end() (transformers' TextStreamer works) or a callable
        receiving each step's tokens (N,) -- a host sync per token while streaming (greedy/sampling).
        use_cuda_graph: capture the decode step once per (rows, length bucket, settings) as a CUDA
        graph and replay it (default True for CUDA models); sync_every: steps between the host's
        checks that the search is over.
        Returns (B * num_return_sequences, L) int64 -- decoder-only: prompt + new tokens; encoder-
        decoder: the decoder sequence from decoder_start_token_id. Finished rows are padded with
        pad_token_id. GenerateOutput when return_dict_in_generate.
        Raises ValueError (naming the argument) for settings it cannot honour.
        """
        gc = _as_generation_config(generation_config or self._generation_defaults()).updated(**kwargs)
        gc.validate()
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids: expected a (B, P) int64 tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}"
                             f"{' ' + str(input_ids.dtype) if isinstance(input_ids, Tensor) else ''}")
        if streamer is not None and gc.num_beams > 1:
            raise ValueError("streamer: beam search does not stream (the best beam is known at the end only)")
        device = self.device
        input_ids = input_ids.to(device)
        B, P_in = input_ids.shape
        if attention_mask is None:
            pad = gc.pad_token_id
            if pad is not None and pad not in gc.eos_ids and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != (B, P_in):
            raise ValueError(f"attention_mask: expected shape {(B, P_in)} like input_ids, got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask.to(device).bool()
        expand = gc.num_beams if gc.num_beams > 1 else gc.num_return_sequences
        if self.is_encoder_decoder:
            start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else gc.bos_token_id
            if start is None:
                raise ValueError("decoder_start_token_id: needed by an encoder-decoder model, got None (and no bos)")
            prompt = torch.full((B, 1), int(start), dtype=torch.long, device=device)
            pmask = torch.ones_like(prompt, dtype=torch.bool)
        else:
            if P_in == 0 or not bool(mask[:, -1].all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
                raise ValueError("attention_mask: generate needs prompts padded on the left (zeros, then ones, "
                                 "with each row's last position a token); pad with padding_side='left'")
            prompt, pmask = input_ids, mask
        P = prompt.shape[1]
        if gc.max_new_tokens is not None:
            max_new = gc.max_new_tokens
        elif gc.max_length is not None:
            max_new = gc.max_length - P
        else:  # no length anywhere: 20 new tokens as transformers 5, within the model's positions
            max_new = max(1, min(20, self.max_positions - P + 1))
        if max_new < 1:
            raise ValueError(f"max_length: the prompt has {P} tokens, so max_length={gc.max_length} leaves no "
                             "room; set max_new_tokens")
        if P + max_new - 1 > self.max_positions:
            what = "max_new_tokens" if gc.max_new_tokens is not None else "max_length"
            raise ValueError(f"{what}: {P} prompt + {max_new} new tokens need {P + max_new - 1} positions, "
                             f"the model has {self.max_positions}")
        if expand > 1:
            prompt, pmask = prompt.repeat_interleave(expand, 0), pmask.repeat_interleave(expand, 0)
        s = _Settings(gc, P, P + max_new, self._vocab_size(), device)
        graph = (device.type == "cuda") if use_cuda_graph is None else bool(use_cuda_graph)
        if graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph: needs a CUDA model, this one is on {device}")
        keep_scores = bool(gc.output_scores and gc.return_dict_in_generate)
        if streamer is not None or keep_scores:
            sync_every, graph = 1, False
        enc_len = input_ids.shape[1] if self.is_encoder_decoder else 0
        st = self._decode_session(prompt.shape[0], P + max_new, enc_len, expand, s, graph, device)
        s = st.settings             # a replayed graph reads the capture's settings tensors: use those
        real = pmask.sum(1)                                                               # (N,) tokens per row
        st.reset(prompt, real, s)
        advance = _beam_advance if gc.num_beams > 1 else _advance
        scores = [] if keep_scores else None
        if streamer is not None:
            _stream(streamer, prompt.cpu())
        if self.is_encoder_decoder:
            self._prefill_cross(self._encode(input_ids, mask.long()), mask, st.cache)
            first = 0                                                    # every token comes from a decode step
        else:
            position_ids = (pmask.long().cumsum(-1) - 1).clamp_(min=0)
            logits = self._prefill(prompt, pmask.long(), position_ids, st.cache)
            st.cache.seqlens.fill_(P)
            if scores is not None:
                scores.append(_scores_of(logits, st, s))
            advance(logits, st, s)
            if streamer is not None:
                _stream(streamer, st.next_ids[:, 0].to("cpu", copy=True))
            first = 1
        for i in range(first, max_new):
            if i > first and (i - first) % sync_every == 0 and bool(st.done):
                break
            self._step(st, s, advance, graph, scores)
            if streamer is not None:
                _stream(streamer, st.next_ids[:, 0].to("cpu", copy=True))
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        if gc.num_beams > 1:
            bs = st.beams
            n = gc.num_return_sequences
            seqs = bs.sequences[:, :n].reshape(B * n, -1)
            gen_len = int((bs.beam_indices[:, :n] != -1).sum(-1).max())
            out = seqs[:, : P + gen_len].clone()
            seq_scores = bs.beam_scores[:, :n].reshape(-1).clone()
        else:
            out = st.tokens[:, : P + int(st.alive_steps)].clone()
            seq_scores = None
        if gc.return_dict_in_generate:
            return GenerateOutput(out, seq_scores if gc.output_scores else None,
                                  tuple(scores) if scores is not None else None)
        return out

    def _decode_session(self, rows: int, total: int, enc_len: int, expand: int, s: _Settings, graph: bool,
                        device) -> _DecodeState:
        """A fresh state, or (CUDA graphs) the captured session of this (rows, length bucket, settings)."""
        if not graph:
            st = _DecodeState(self._cache_for(rows, total, enc_len, expand, s), rows, total, device)
            st.settings = s
            return st
        cache_len = -(-total // 128) * 128              # one cache serves every length in a 128 bucket
        # a session is tied to the parameters it captured (a .to() or re-load elsewhere makes a new one)
        key = (rows, cache_len, total, enc_len, expand, s.key(), self.dtype, self.device,
               next(self.parameters()).data_ptr(), requested(None))   # the kernels' backend is captured too
        sessions = self.__dict__.setdefault("_graph_sessions", {})
        if key not in sessions:
            if len(sessions) >= 4:                       # bounded memory: drop the oldest capture
                sessions.pop(next(iter(sessions)))
            st = _DecodeState(self._cache_for(rows, cache_len, enc_len, expand, s), rows, total, device)
            # the graph reads these settings' tensors by address: they live as long as the session
            # (a per-call _Settings would be freed after the call and its memory reused)
            st.settings = s
            sessions[key] = st
        return sessions[key]

    def _cache_for(self, rows: int, max_len: int, enc_len: int, expand: int, s: "_Settings"):
        if self.is_encoder_decoder:
            cache = self._new_cache(rows, max_len, encoder_len=enc_len, num_beams=expand)
        else:
            cache = self._new_cache(rows, max_len)
        if s.num_beams > 1 and _page_beams(cache.seqlens.device):
            cache.use_pages()  # beams reorder a page table, not the caches
        return cache

    def _eager_step(self, st: _DecodeState, s: _Settings, advance, scores=None) -> None:
        logits = self._decode_step(st.next_ids, st.positions, st.cache)
        st.cache.seqlens += 1
        if scores is not None:
            scores.append(_scores_of(logits, st, s))
        advance(logits, st, s)

    def _step(self, st: _DecodeState, s: _Settings, advance, graph: bool, scores=None) -> None:
        if not graph:
            return self._eager_step(st, s, advance, scores)
        if st.graph is None:
            # the first step runs eagerly on a side stream (compiles kernels, allocates), then the
            # next one is captured; capturing does not execute, so this call's one step is the eager one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager_step(st, s, advance)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._eager_step(st, s, advance)
            st.graph = g
            return
        st.graph.replay()


def _scores_of(logits: Tensor, st: _DecodeState, s: _Settings) -> Tensor:
    """What transformers returns as a step's `scores`: the processed scores (greedy/sampling), the
    processed log-probabilities (beam search; before the running beam scores are added)."""
    x = logits.float()
    if s.num_beams > 1:
        x = torch.log_softmax(x, -1)
    return _process(x, st.tokens, st.cur, s, st.cache.leftpad)


def _as_generation_config(gc) -> GenerationConfig:
    """Ours, or transformers' GenerationConfig converted: its non-default fields must all be ones
    fastlayers implements (else TypeError naming them, rather than ignoring them)."""
    if isinstance(gc, GenerationConfig):
        return gc
    if not hasattr(gc, "to_diff_dict"):
        raise TypeError(f"generation_config: expected a GenerationConfig (fastlayers' or transformers'), got "
                        f"{type(gc).__name__}")
    d = {k: v for k, v in gc.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}
    unknown = sorted(k for k in d if k not in GenerationConfig.field_names())
    if unknown:
        raise TypeError(f"generation_config: fields fastlayers does not implement are set: {unknown}")
    return GenerationConfig.from_dict(d)


def _stream(streamer, tokens: Tensor) -> None:
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)
