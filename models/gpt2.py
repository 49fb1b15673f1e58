"""GPT-2 on fastlayers ops, named like Hugging Face checkpoints (transformers' modeling_gpt2).

Every layer goes through the ops: the QKV projection (`c_attn`, one GEMM), the MLP (GELU-tanh
fused into `c_fc`), causal attention with padding through `key_padding_mask`, and each pre-norm
`ln_1` / `ln_2` / `ln_f` fused with the residual add before it (fl.layer_norm(delta, residual=x)
returns the norm and the new residual stream in one kernel). Checkpoints store the projections as
`Conv1D` weights (in, out); they load and save in that layout (Conv1DLinear).

Generation (models/generation.py) drives `_prefill` and `_decode_step`: a static KV cache per
layer (B, Lmax, n_head, head_dim), filled by the prompt through fl.attention and appended in
place by fl.attention_with_kvcache, which skips each row's left padding (`cache_leftpad`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastlayers as fl

from .bert import _check_ids, _dropout, attention_probs, sequence_classification_loss
from .config import ACTIVATION_OF, GPT2Config
from .generation import GenerationMixin, StaticKVCache
from .layers import Conv1DLinear, padding_mask
from .loading import PreTrainedModel, init_normal_
from .outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput, maybe_tuple


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = Conv1DLinear(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1DLinear(config.n_embd, config.n_embd)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        self.layer_idx = layer_idx
        self.attn_pdrop, self.resid_pdrop = config.attn_pdrop, config.resid_pdrop

    def forward(self, h: Tensor, key_padding_mask: Optional[Tensor], output_attentions: bool = False,
                cache: Optional[StaticKVCache] = None, decode: bool = False):
        """h (B, T, E) -> (dropout(c_proj(attention)), probs or None). With a cache: prefill (decode
        False) writes this layer's K/V for slots [0, T); decode appends T new rows at cache.seqlens."""
        B, T, _ = h.shape
        qkv = self.c_attn(h).view(B, T, 3, self.num_heads, self.head_dim)          # (B, T, 3, nh, D)
        q, k, v = qkv.unbind(2)                                                      # (B, T, nh, D) views
        probs = None
        if decode:
            o = fl.attention_with_kvcache(q, *cache.kv(self.layer_idx), cache.seqlens, k, v, causal=True,
                                          softmax_scale=self.scale, cache_leftpad=cache.leftpad,
                                          block_table=cache.block_table)
        else:
            p = self.attn_pdrop if self.training else 0.0
            o = fl.attention(q, k, v, causal=True, softmax_scale=self.scale, key_padding_mask=key_padding_mask,
                             dropout_p=p)
            if cache is not None:
                cache.k[self.layer_idx][:, :T].copy_(k)
                cache.v[self.layer_idx][:, :T].copy_(v)
            if output_attentions:
                if p > 0:
                    raise ValueError("output_attentions: the fused kernel draws attention dropout inside; call "
                                     "model.eval() (or set attn_pdrop=0) to get the probabilities")
                probs = attention_probs(q, k, key_padding_mask, causal=True, scale=self.scale)
        y = self.c_proj(o.reshape(B, T, -1))
        return _dropout(y, self.resid_pdrop, self.training), probs


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Conv1DLinear(config.inner_size, config.n_embd)
        self.c_proj = Conv1DLinear(config.n_embd, config.inner_size)
        self.activation = ACTIVATION_OF[config.activation_function]
        self.resid_pdrop = config.resid_pdrop

    def forward(self, h: Tensor) -> Tensor:
        return _dropout(self.c_proj(self.c_fc(h, activation=self.activation)), self.resid_pdrop, self.training)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, delta: Optional[Tensor], key_padding_mask, output_attentions=False, cache=None,
                decode=False):
        """Residual stream x and the previous block's not-yet-added output delta -> (x', delta', x_in, probs):
        x_in = x + delta (this block's input hidden state), x' = x_in + attention, delta' = the MLP output."""
        h, x = _norm_add(self.ln_1, delta, x)
        a, probs = self.attn(h, key_padding_mask, output_attentions, cache, decode)
        h2, x2 = _norm_add(self.ln_2, a, x)
        return x2, self.mlp(h2), x, probs


def _norm_add(ln: nn.LayerNorm, delta: Optional[Tensor], x: Tensor):
    """(ln(x + delta), x + delta) in one kernel; delta None -> (ln(x), x)."""
    if delta is None:
        return fl.layer_norm(x, ln.weight, ln.bias, ln.eps), x
    return fl.layer_norm(delta, ln.weight, ln.bias, ln.eps, residual=x)


class GPT2PreTrainedModel(PreTrainedModel):
    config_class = GPT2Config
    base_model_prefix = "transformer"
    ignored_keys = (r"(^|\.)attn\.(masked_)?bias$", r"(^|\.)position_ids$")   # old checkpoints' mask buffers

    def _init_weights(self, module: nn.Module) -> None:
        init_normal_(module, self.config.initializer_range)
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            # GPT-2's scaled init of the residual projections: std / sqrt(2 * n_layer)
            module.c_proj.weight.normal_(0.0, self.config.initializer_range / (2 * self.config.n_layer) ** 0.5)

class GPT2Model(GPT2PreTrainedModel):
    """GPT-2 body: wte + wpe, n_layer pre-norm blocks, ln_f."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: Optional[bool] = None):
        """input_ids (B, L) int or inputs_embeds (B, L, E); attention_mask (B, L) 1 = token, 0 = padding
        (left or right); position_ids (B, L) (default 0..L-1, as transformers' forward: pass
        cumsum(mask) - 1 for left padding, as generate does); token_type_ids (B, L) index wte as in
        transformers. Returns BaseModelOutput: last_hidden_state (B, L, E) after ln_f; hidden_states
        (n_layer + 1: each block's input, then the final ln_f output) and attentions as transformers.
        Raises ValueError naming a bad argument."""
        B, L, device = _input_shape(self.config, input_ids, inputs_embeds)
        if position_ids is None:
            position_ids = torch.arange(L, device=device).expand(B, L)
        else:
            _check_ids("position_ids", position_ids, 2, (B, L), broadcast=True)
        _check_positions(self.config, L)
        key_padding_mask = padding_mask(attention_mask, B, L)
        x = self._embed(input_ids, inputs_embeds, position_ids, token_type_ids)
        x, hidden, attns = self._blocks(x, key_padding_mask, output_hidden_states, output_attentions)
        return maybe_tuple(BaseModelOutput(x, hidden, attns), return_dict)

    def _embed(self, input_ids, inputs_embeds, position_ids, token_type_ids=None) -> Tensor:
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)
        return _dropout(x, self.config.embd_pdrop, self.training)

    def _blocks(self, x, key_padding_mask, output_hidden_states=False, output_attentions=False, cache=None,
                decode=False):
        hidden, attns = (() if output_hidden_states else None), (() if output_attentions else None)
        delta = None
        for block in self.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                x, delta, x_in, probs = checkpoint(block, x, delta, key_padding_mask, output_attentions,
                                                   use_reentrant=False)
            else:
                x, delta, x_in, probs = block(x, delta, key_padding_mask, output_attentions, cache, decode)
            if output_hidden_states:
                hidden += (x_in,)
            if output_attentions:
                attns += (probs,)
        out, _ = _norm_add(self.ln_f, delta, x)
        if output_hidden_states:
            hidden += (out,)
        return out, hidden, attns


def _input_shape(config, input_ids, inputs_embeds):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids / inputs_embeds: pass exactly one of them, got "
                         + ("both" if input_ids is not None else "neither"))
    if input_ids is not None:
        _check_ids("input_ids", input_ids, 2)
        return input_ids.shape[0], input_ids.shape[1], input_ids.device
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(f"inputs_embeds: expected (B, L, {config.hidden_size}), got {tuple(inputs_embeds.shape)}")
    return inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.device


def _check_positions(config, L: int) -> None:
    if L > config.max_position_embeddings:
        raise ValueError(f"input_ids: sequence length {L} exceeds n_positions={config.max_position_embeddings}; "
                         "truncate the input")


class GPT2LMHeadModel(GPT2PreTrainedModel, GenerationMixin):
    """GPT-2 + the LM head (tied to wte unless tie_word_embeddings is false). labels (B, L) int,
    -100 ignored: loss = cross-entropy of logits[:, :-1] against labels[:, 1:] (transformers' shift).
    logits (B, L, vocab_size) in the model's dtype."""
    tied_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                return_dict=None):
        out = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = fl.linear(out.last_hidden_state, self.lm_head.weight)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return maybe_tuple(MaskedLMOutput(loss, logits, out.hidden_states, out.attentions), return_dict)

    # ------------------------------------------------------------------ generation hooks
    def _new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        c = self.config
        return StaticKVCache(c.n_layer, batch, max_len, c.n_head, c.n_embd // c.n_head, self.dtype, self.device)

    def _prefill(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Prompt (B, P) -> last position's logits (B, V) float32; writes cache slots [0, P)."""
        _check_positions(self.config, input_ids.shape[1])
        t = self.transformer
        x = t._embed(input_ids, None, position_ids)
        x, _, _ = t._blocks(x, attention_mask.bool(), cache=cache)
        return fl.linear(x[:, -1], self.lm_head.weight).float()

    def _decode_step(self, input_ids: Tensor, position_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One new token per row (B, 1) at cache.seqlens -> logits (B, V) float32 (seqlens not advanced)."""
        t = self.transformer
        x = t._embed(input_ids, None, position_ids)
        x, _, _ = t._blocks(x, None, cache=cache, decode=True)
        return fl.linear(x[:, -1], self.lm_head.weight).float()

    @property
    def max_positions(self) -> int:
        return self.config.n_positions


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] (ignore_index -100), in float32."""
    labels = labels.to(logits.device)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift.reshape(-1), ignore_index=-100)


class GPT2ForSequenceClassification(GPT2PreTrainedModel):
    """GPT-2 + `score` (no bias) at each row's last non-pad token (the rightmost token that is not
    pad_token_id; the last position when pad_token_id is None, which allows batch 1 only, as in
    transformers). logits (B, num_labels); labels and loss as BertForSequenceClassification."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                return_dict=None):
        out = self.transformer(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = fl.linear(out.last_hidden_state, self.score.weight)                  # (B, L, n)
        B = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("pad_token_id: config.pad_token_id is None, so only batch size 1 can be "
                             f"classified (the last token of each row is unknown), got batch {B}")
        if pad is None or input_ids is None:
            last = torch.full((B,), logits.shape[1] - 1, device=logits.device)
        else:
            idx = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (idx * (input_ids != pad).to(logits.device, torch.int32)).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]                  # (B, n)
        loss = None if labels is None else sequence_classification_loss(pooled, labels, self.config)
        return maybe_tuple(SequenceClassifierOutput(loss, pooled, out.hidden_states, out.attentions), return_dict)
