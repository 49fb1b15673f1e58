"""Generation shared by the decoder families: static KV cache, logits processors, greedy and
sampling decode, and the CUDA-graph step.

Semantics follow transformers' `generate` (argument names, defaults, processor formulas, the
returned prompt + new tokens, finished rows padded with pad_token_id), so greedy decoding gives
transformers' ids on the same checkpoint, left-padded batches included.

Design (gpt-fast's static cache, extended to left padding):
  - one StaticKVCache per call (or per captured session): k/v (B, Lmax, H, D) per layer, plus
    `seqlens` (B,) int32 -- slots filled -- and `leftpad` (B,) int32 -- each row's left padding,
    which fl.attention_with_kvcache skips;
  - every per-step quantity lives on the device (the token buffer, the write index, the step
    counter, the unfinished flags), and every processor is a fixed-shape tensor program over the
    whole token buffer, so one step has fixed shapes and addresses: it is captured once per
    (batch, Lmax, settings) as a CUDA graph and replayed. The host reads the device only to stop
    early, every `sync_every` tokens, and at the end.
  - sampling draws with the exponential race (argmax p / E, E ~ Exp(1)): one fixed-shape kernel
    that CUDA graphs capture, distributed exactly as multinomial(p); reproducible under
    torch.manual_seed.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

GENERATION_CONFIG_NAME = "generation_config.json"


class StaticKVCache:
    """Per-layer k/v caches (B, Lmax, H, D) with the rows' fill lengths and left padding (int32, (B,))."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, max_len, num_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.leftpad = torch.zeros(batch, dtype=torch.int32, device=device)
        self.batch, self.max_len = batch, max_len


# ---------------------------------------------------------------------------------------- config
@dataclass
class GenerationConfig:
    """transformers' GenerationConfig fields that fastlayers implements (same names and defaults)."""
    max_length: int = 20
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
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                   pad_token_id=config.pad_token_id)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    def updated(self, **kwargs) -> "GenerationConfig":
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"generate: unknown argument(s) {unknown}; supported: {sorted(names)} plus "
                            "attention_mask, streamer, use_cuda_graph, sync_every")
        return dataclasses.replace(self, **kwargs)

    @property
    def eos_ids(self) -> list:
        e = self.eos_token_id
        return [] if e is None else ([int(e)] if isinstance(e, int) else [int(x) for x in e])

    def validate(self) -> None:
        def bad(name, want):
            raise ValueError(f"{name}: expected {want}, got {getattr(self, name)!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            bad("max_new_tokens", "an int >= 1")
        for name in ("max_length", "min_length", "no_repeat_ngram_size", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "an int >= 0")
        if self.min_new_tokens is not None and (not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0):
            bad("min_new_tokens", "an int >= 0")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            bad("num_return_sequences", "an int >= 1")
        if self.do_sample and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad("temperature", "a float > 0 (strictly positive) with do_sample=True")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            bad("top_p", "a float in (0, 1]")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a float > 0")
        if self.num_beams != 1:
            bad("num_beams", "1 (beam search comes with the encoder-decoder generation)")
        if not self.do_sample and self.num_return_sequences != 1:
            raise ValueError(f"num_return_sequences: greedy decoding returns one sequence per prompt; got "
                             f"{self.num_return_sequences} without do_sample=True")


def load_generation_config(model_dir, model_config) -> GenerationConfig:
    """generation_config.json of the folder when present, else the model config's token ids."""
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    if path.is_file():
        return GenerationConfig.from_dict(json.loads(path.read_text()))
    return GenerationConfig.from_model_config(model_config)


# ---------------------------------------------------------------------------------------- processors
def top_k_filter(scores: Tensor, top_k: int) -> Tensor:
    """transformers' TopKLogitsWarper: keep the top_k largest scores (ties at the k-th kept), -inf elsewhere."""
    k = min(max(top_k, 1), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """transformers' TopPLogitsWarper: drop the least likely tokens whose cumulative probability is at
    most 1 - top_p (sorted ascending), always keeping the most likely one."""
    sorted_scores, idx = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))


def sample_from_scores(scores: Tensor) -> Tensor:
    """One token per row drawn from softmax(scores) by the exponential race: argmax(p / E),
    E ~ Exp(1) i.i.d. -- exactly the categorical distribution, in fixed-shape kernels."""
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(-1)


class _DecodeState:
    """The device-side state of one generation: token buffer, indices, flags (all fixed shapes)."""

    def __init__(self, model, batch: int, total_len: int, cache_len: int, device):
        self.cache = model._new_cache(batch, cache_len)
        self.tokens = torch.zeros(batch, total_len, dtype=torch.long, device=device)   # prompt + new tokens
        self.cur = torch.zeros((), dtype=torch.long, device=device)       # where the next token goes
        self.step = torch.zeros((), dtype=torch.long, device=device)      # new tokens so far
        self.alive_steps = torch.zeros((), dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.next_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph = None


class _Settings:
    """Everything a step bakes in (a captured graph's key), resolved from a GenerationConfig."""

    def __init__(self, gc: GenerationConfig, prompt_len: int, vocab: int, device):
        self.do_sample = bool(gc.do_sample)
        self.temperature = float(gc.temperature)
        self.top_k = int(gc.top_k) if gc.do_sample else 0
        self.top_p = float(gc.top_p) if gc.do_sample else 1.0
        self.repetition_penalty = float(gc.repetition_penalty)
        self.ngram = int(gc.no_repeat_ngram_size)
        self.min_new = max(gc.min_length - prompt_len, gc.min_new_tokens or 0, 0)
        self.eos = [e for e in gc.eos_ids if 0 <= e < vocab]
        pad = gc.pad_token_id if gc.pad_token_id is not None else (gc.eos_ids[0] if gc.eos_ids else 0)
        self.pad = int(pad)
        self.eos_t = torch.tensor(self.eos, dtype=torch.long, device=device)
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.eos_mask[self.eos_t] = True

    def key(self):
        return (self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.ngram,
                self.min_new, tuple(self.eos), self.pad)


def _process(scores: Tensor, st: _DecodeState, s: _Settings) -> Tensor:
    """transformers' processors in its order, over the whole token buffer (valid slots < st.cur)."""
    B, V = scores.shape
    T = st.tokens.shape[1]
    valid = torch.arange(T, device=scores.device)[None, :] < st.cur                     # (1, T)
    if s.repetition_penalty != 1.0:
        present = torch.zeros_like(scores).scatter_reduce_(1, st.tokens, valid.expand(B, T).to(scores.dtype),
                                                           "amax")
        pen = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
        scores = torch.where(present > 0, pen, scores)
    n = s.ngram
    if n > 0 and T >= n:
        win = st.tokens.unfold(1, n, 1)                                                    # (B, T-n+1, n)
        j = torch.arange(win.shape[1], device=scores.device)
        last_pos = (st.cur - (n - 1) + torch.arange(n - 1, device=scores.device)).clamp(0, T - 1)
        last = st.tokens[:, last_pos]                                                      # (B, n-1)
        match = (win[..., : n - 1] == last[:, None, :]).all(-1) & (j + n <= st.cur)[None]
        banned = torch.zeros_like(scores).scatter_reduce_(1, win[..., n - 1], match.to(scores.dtype), "amax")
        scores = scores.masked_fill(banned > 0, float("-inf"))
    if s.min_new > 0 and s.eos:
        scores = scores.masked_fill(s.eos_mask[None, :] & (st.step < s.min_new), float("-inf"))
    if s.do_sample:
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k > 0:
            scores = top_k_filter(scores, s.top_k)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p)
    return scores


def _advance(logits: Tensor, st: _DecodeState, s: _Settings) -> None:
    """Chooses each row's next token from logits (B, V) and updates the state in place."""
    scores = _process(logits.float(), st, s)
    tok = sample_from_scores(scores) if s.do_sample else scores.argmax(-1)                # (B,)
    alive = st.unfinished.any()
    tok = torch.where(st.unfinished, tok, torch.full_like(tok, s.pad))
    st.tokens.scatter_(1, st.cur.view(1, 1).expand(tok.shape[0], 1), tok[:, None])
    if s.eos:
        st.unfinished &= ~(tok[:, None] == s.eos_t[None, :]).any(-1)
    st.alive_steps += alive.to(torch.long)
    st.cur += 1
    st.step += 1
    st.next_ids.copy_(tok[:, None])
    st.positions += 1


class GenerationMixin:
    """generate() for decoder-only models implementing `_new_cache(batch, max_len)`,
    `_prefill(input_ids, attention_mask, position_ids, cache) -> logits (B, V)`,
    `_decode_step(input_ids (B, 1), position_ids (B, 1), cache) -> logits (B, V)` and `max_positions`."""

    generation_config: Optional[GenerationConfig] = None

    def _generation_defaults(self) -> GenerationConfig:
        if self.generation_config is None:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        return self.generation_config

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 generation_config: Optional[GenerationConfig] = None, streamer=None,
                 use_cuda_graph: Optional[bool] = None, sync_every: int = 16, **kwargs) -> Tensor:
        """Greedy or sampled continuation of a batch of prompts, as transformers' `generate`.

        input_ids: (B, P) int64 prompts, left-padded when their lengths differ; attention_mask:
        (B, P), 1 = token, 0 = left padding (None: inferred from pad_token_id as transformers does).
        kwargs: GenerationConfig fields (max_new_tokens, max_length, min_new_tokens, min_length,
        do_sample, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size,
        eos_token_id (int or list), pad_token_id, num_return_sequences); defaults from the folder's
        generation_config.json, else transformers' defaults.
        streamer: an object with put(tokens)/end() (transformers' TextStreamer works) or a callable
        receiving each step's tokens (B,) -- one host sync per token while streaming.
        use_cuda_graph: capture the decode step as a CUDA graph and replay it (default: True for CUDA
        models); sync_every: tokens between the host's checks that every row is finished.
        Returns (B * num_return_sequences, P + new) int64: prompt and new tokens; rows that finished
        early are padded with pad_token_id (else the first eos id).
        Raises ValueError for arguments it cannot honour (right padding, too long for the positions).
        """
        gc = (generation_config or self._generation_defaults()).updated(**kwargs)
        gc.validate()
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids: expected a (B, P) int64 tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}"
                             f"{' ' + str(input_ids.dtype) if isinstance(input_ids, Tensor) else ''}")
        device = self.device
        input_ids = input_ids.to(device)
        B0, P = input_ids.shape
        if attention_mask is None:
            pad = gc.pad_token_id
            if pad is not None and pad not in gc.eos_ids and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != (B0, P):
            raise ValueError(f"attention_mask: expected shape {(B0, P)} like input_ids, got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device).bool()
        if P == 0 or not bool(mask[:, -1].all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            raise ValueError("attention_mask: generate needs prompts padded on the left (zeros, then ones, with "
                             "each row's last position a token); pad with padding_side='left'")
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - P
        if max_new < 1:
            raise ValueError(f"max_length: the prompt has {P} tokens, so max_length={gc.max_length} leaves no room; "
                             "set max_new_tokens")
        if P + max_new - 1 > self.max_positions:
            raise ValueError(f"max_new_tokens: prompt ({P}) + {max_new} new tokens needs {P + max_new - 1} positions, "
                             f"the model has {self.max_positions}")
        n = gc.num_return_sequences
        if n > 1:
            input_ids, mask = input_ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        B = input_ids.shape[0]
        s = _Settings(gc, P, self._vocab_size(), device)
        graph = (device.type == "cuda") if use_cuda_graph is None else bool(use_cuda_graph)
        if graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph: needs a CUDA model, this one is on {device}")
        if streamer is not None:
            sync_every = 1
        total = P + max_new
        st = self._decode_session(B, total, s, graph, device)
        st.tokens.fill_(s.pad)
        st.tokens[:, :P] = input_ids
        st.cur.fill_(P)
        st.step.zero_()
        st.alive_steps.zero_()
        st.unfinished.fill_(True)
        real = mask.sum(1)                                                                 # (B,) tokens per row
        st.cache.leftpad.copy_(P - real)
        st.cache.seqlens.zero_()
        st.positions.copy_((real - 1)[:, None])
        position_ids = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        if streamer is not None:
            _stream(streamer, input_ids.cpu())
        logits = self._prefill(input_ids, mask.long(), position_ids, st.cache)
        st.cache.seqlens.fill_(P)
        _advance(logits, st, s)
        if streamer is not None:
            _stream(streamer, st.next_ids[:, 0].cpu())
        for i in range(1, max_new):
            if i % sync_every == 0 and not bool(st.unfinished.any()):
                break
            self._step(st, s, graph)
            if streamer is not None:
                _stream(streamer, st.next_ids[:, 0].cpu())
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        return st.tokens[:, : P + int(st.alive_steps)].clone()

    def _vocab_size(self) -> int:
        return self.config.vocab_size

    def _decode_session(self, B: int, total: int, s: _Settings, graph: bool, device) -> _DecodeState:
        """A fresh state, or (CUDA graphs) the captured session of this (B, Lmax, settings)."""
        if not graph:
            return _DecodeState(self, B, total, total, device)
        cache_len = -(-total // 128) * 128              # one session serves every length in a 128 bucket
        # a session is tied to the parameters it captured (a .to() or re-load elsewhere makes a new one)
        key = (B, cache_len, s.key(), self.dtype, self.device, next(self.parameters()).data_ptr())
        sessions = self.__dict__.setdefault("_graph_sessions", {})
        if key not in sessions:
            if len(sessions) >= 4:                       # bounded memory: drop the oldest capture
                sessions.pop(next(iter(sessions)))
            sessions[key] = _DecodeState(self, B, cache_len, cache_len, device)
        return sessions[key]

    def _eager_step(self, st: _DecodeState, s: _Settings) -> None:
        logits = self._decode_step(st.next_ids, st.positions, st.cache)
        st.cache.seqlens += 1
        _advance(logits, st, s)

    def _step(self, st: _DecodeState, s: _Settings, graph: bool) -> None:
        if not graph:
            return self._eager_step(st, s)
        if st.graph is None:
            # the first step runs eagerly on a side stream (compiles kernels, allocates), then the
            # next one is captured; capturing does not execute, so it is replayed right after
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager_step(st, s)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._eager_step(st, s)
            st.graph = g
            return
        st.graph.replay()


def _stream(streamer, tokens: Tensor) -> None:
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)
