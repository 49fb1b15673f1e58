"""BART on fastlayers ops, named like Hugging Face checkpoints (transformers' modeling_bart).

What makes real checkpoints match, each tested in tests/test_bart.py:
  - `shared` word embeddings tied to encoder.embed_tokens, decoder.embed_tokens and (conditional
    generation) lm_head when config.tie_word_embeddings -- all of them or none, as transformers 5;
  - learned positions with BART's offset: embed_positions has max_position_embeddings + 2 rows and
    position p reads row p + 2 (encoder and decoder positions count from 0, padding ignored);
  - word embeddings * sqrt(d_model) when scale_embedding (inputs_embeds are used as given);
  - layernorm_embedding on word + position embeddings (the add fused into the norm);
  - post-norm layers, LayerNorm(x + dropout(sublayer(x))): the add fused into the output GEMM
    (eval, or no dropout) or into the norm (training with dropout), as bert.py;
  - the fp16 encoder clamp (`fp16_clamp`), on the device;
  - activation_function fused into fc1; separate encoder/decoder head counts and FFN sizes.
Projections: self-attention q/k/v is one GEMM (FusedLinear over q_proj/k_proj/v_proj);
cross-attention has q_proj alone and k/v as one GEMM on the encoder output (FusedLinear over
k_proj/v_proj). Padding: attention_mask (B, Ls), 1 = token, masks the encoder's keys and every
cross-attention's keys; decoder_attention_mask (B, Lt) masks the decoder's keys, on top of causal.

Generation hooks (models/generation.py drives them; rows in beam-major order b * num_beams + j):
`_encode`, `_new_cache`, `_prefill_cross` (every layer's cross K/V once, into the cache, in place)
and `_decode_step` (one token per row; self-attention through fl.attention_with_kvcache, cross-
attention as one fl.attention per layer with the beams of an input as its queries, so the cross
K/V are never repeated per beam).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastlayers as fl

from .bert import _check_ids, _dropout, attention_probs, sequence_classification_loss
from .config import ACTIVATION_OF, BartConfig
from .generation import GenerationMixin, StaticKVCache
from .layers import FusedLinear, padding_mask
from .loading import PreTrainedModel, init_normal_
from .outputs import (BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput, Seq2SeqSequenceClassifierOutput,
                      maybe_tuple)

POSITION_OFFSET = 2     # BART's learned positions: row p + 2 holds position p (fairseq's padding hack)


def fp16_clamp(h: Tensor) -> Tensor:
    """transformers' BartEncoderLayer: an fp16 hidden state holding any inf/NaN is clamped, whole, to
    +-(finfo.max - 1000) (NaN stays NaN); other dtypes pass. One device-side select, no host sync."""
    if h.dtype != torch.float16:
        return h
    c = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isfinite(h).all(), h, h.clamp(-c, c))


def shift_tokens_right(input_ids: Tensor, pad_token_id: Optional[int], decoder_start_token_id: int) -> Tensor:
    """transformers' shift: [start, ids[:-1]] per row, -100 (ignored labels) replaced by pad."""
    if pad_token_id is None:
        raise ValueError("pad_token_id: config.pad_token_id has to be set to shift labels into decoder inputs")
    if decoder_start_token_id is None:
        raise ValueError("decoder_start_token_id: config.decoder_start_token_id has to be set to shift labels "
                         "into decoder inputs")
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


class BartLearnedPositionalEmbedding(nn.Embedding):
    """(max_position_embeddings + 2, d_model); forward(position_ids) reads rows position_ids + 2."""

    def __init__(self, num_positions: int, embedding_dim: int):
        super().__init__(num_positions + POSITION_OFFSET, embedding_dim)

    def forward(self, position_ids: Tensor) -> Tensor:
        return super().forward(position_ids + POSITION_OFFSET)


# ------------------------------------------------------------------------------------ attention
class BartSelfAttention(nn.Module):
    """q/k/v in one GEMM; checkpoint keys `<self_attn>.{q,k,v}_proj.*` and `out_proj.*`."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.qkv = FusedLinear(d_model, {"q_proj": d_model, "k_proj": d_model, "v_proj": d_model})
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout_p = dropout

    def _qkv(self, x: Tensor):
        B, L, _ = x.shape
        return self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).unbind(2)     # 3 x (B, L, H, D) views

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], causal: bool, output_attentions: bool):
        """x (B, L, E) -> (context (B, L, E) before out_proj, probs (B, H, L, L) or None)."""
        q, k, v = self._qkv(x)
        p = self.dropout_p if self.training else 0.0
        o = fl.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=p)
        return o.reshape(x.shape), _probs(q, k, key_padding_mask, causal, output_attentions, p)

    def decode(self, x: Tensor, cache: StaticKVCache, layer_idx: int) -> Tensor:
        """x (N, 1, E): appends this token's k/v at cache.seqlens and attends the cache, causal."""
        q, k, v = self._qkv(x)                                                          # (N, 1, H, D)
        o = fl.attention_with_kvcache(q, *cache.kv(layer_idx), cache.seqlens, k, v, causal=True,
                                      block_table=cache.block_table)
        return o.reshape(x.shape)


class BartCrossAttention(nn.Module):
    """q_proj alone (on the decoder stream), k/v in one GEMM on the encoder output; checkpoint keys
    `<encoder_attn>.{q,k,v,out}_proj.*`."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv = FusedLinear(d_model, {"k_proj": d_model, "v_proj": d_model})
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout_p = dropout

    def project_kv(self, encoder_hidden: Tensor):
        """(B, Ls, E) -> k, v (B, Ls, H, D) views of one GEMM's output."""
        B, Ls, _ = encoder_hidden.shape
        return self.kv(encoder_hidden).view(B, Ls, 2, self.num_heads, self.head_dim).unbind(2)

    def _q(self, x: Tensor, *shape) -> Tensor:
        return fl.linear(x, self.q_proj.weight, self.q_proj.bias).view(*shape, self.num_heads, self.head_dim)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, encoder_mask: Optional[Tensor], output_attentions: bool):
        """x (B, Lt, E), k/v (B, Ls, H, D) -> (context (B, Lt, E), probs (B, H, Lt, Ls) or None)."""
        q = self._q(x, *x.shape[:2])                                                   # (B, Lt, H, D)
        p = self.dropout_p if self.training else 0.0
        o = fl.attention(q, k, v, key_padding_mask=encoder_mask, dropout_p=p)
        return o.reshape(x.shape), _probs(q, k, encoder_mask, False, output_attentions, p)

    def decode(self, x: Tensor, k: Tensor, v: Tensor, encoder_mask: Tensor, num_beams: int) -> Tensor:
        """x (N, 1, E) with N = B_enc * num_beams rows, beam-major; k/v (B_enc, Ls, H, D) once per input.
        An input's beams are independent queries of one non-causal attention over its keys."""
        q = self._q(x, k.shape[0], num_beams)                                          # (B_enc, nb, H, D)
        return fl.attention(q, k, v, key_padding_mask=encoder_mask).reshape(x.shape)


def _probs(q, k, key_padding_mask, causal, output_attentions, p):
    if not output_attentions:
        return None
    if p > 0:
        raise ValueError("output_attentions: the fused kernel draws attention dropout inside; call model.eval() "
                         "(or set attention_dropout=0) to get the probabilities")
    return attention_probs(q, k, key_padding_mask, causal=causal)


# ------------------------------------------------------------------------------------ layers
class _PostNormLayer(nn.Module):
    """The sublayer plumbing encoder and decoder layers share (fc1/fc2/final_layer_norm included)."""

    def __init__(self, config: BartConfig, ffn_dim: int):
        super().__init__()
        d = config.d_model
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.activation = ACTIVATION_OF[config.activation_function]
        self.dropout_p, self.activation_dropout_p = config.dropout, config.activation_dropout

    def _add_norm(self, proj: nn.Linear, ln: nn.LayerNorm, h: Tensor, residual: Tensor) -> Tensor:
        """LayerNorm(residual + dropout(proj(h))), the add fused into the GEMM or (dropout) the norm."""
        if self.training and self.dropout_p > 0:
            y = F.dropout(fl.linear(h, proj.weight, proj.bias), self.dropout_p, True)
            return fl.layer_norm(y, ln.weight, ln.bias, ln.eps, residual=residual)[0]
        y = fl.linear(h, proj.weight, proj.bias, residual=residual)
        return fl.layer_norm(y, ln.weight, ln.bias, ln.eps)

    def _ffn(self, x: Tensor) -> Tensor:
        h = fl.linear(x, self.fc1.weight, self.fc1.bias, activation=self.activation)  # (B, L, ffn_dim)
        h = _dropout(h, self.activation_dropout_p, self.training)
        return self._add_norm(self.fc2, self.final_layer_norm, h, x)


class BartEncoderLayer(_PostNormLayer):
    def __init__(self, config: BartConfig):
        super().__init__(config, config.encoder_ffn_dim)
        self.self_attn = BartSelfAttention(config.d_model, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], output_attentions: bool = False):
        a, probs = self.self_attn(x, key_padding_mask, False, output_attentions)
        x = self._add_norm(self.self_attn.out_proj, self.self_attn_layer_norm, a, x)
        return fp16_clamp(self._ffn(x)), probs


class BartDecoderLayer(_PostNormLayer):
    def __init__(self, config: BartConfig):
        super().__init__(config, config.decoder_ffn_dim)
        d, h, p = config.d_model, config.decoder_attention_heads, config.attention_dropout
        self.self_attn = BartSelfAttention(d, h, p)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = BartCrossAttention(d, h, p)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], encoder_hidden: Tensor,
                encoder_mask: Optional[Tensor], output_attentions: bool = False):
        """-> (x', self-attention probs, cross-attention probs) (probs None unless asked)."""
        a, p_self = self.self_attn(x, key_padding_mask, True, output_attentions)
        x = self._add_norm(self.self_attn.out_proj, self.self_attn_layer_norm, a, x)
        k, v = self.encoder_attn.project_kv(encoder_hidden)
        c, p_cross = self.encoder_attn(x, k, v, encoder_mask, output_attentions)
        x = self._add_norm(self.encoder_attn.out_proj, self.encoder_attn_layer_norm, c, x)
        return self._ffn(x), p_self, p_cross

    def decode(self, x: Tensor, cache: StaticKVCache, layer_idx: int) -> Tensor:
        a = self.self_attn.decode(x, cache, layer_idx)
        x = self._add_norm(self.self_attn.out_proj, self.self_attn_layer_norm, a, x)
        c = self.encoder_attn.decode(x, cache.cross_k[layer_idx], cache.cross_v[layer_idx], cache.cross_mask,
                                     cache.num_beams)
        x = self._add_norm(self.encoder_attn.out_proj, self.encoder_attn_layer_norm, c, x)
        return self._ffn(x)


# ------------------------------------------------------------------------------------ stacks
class _BartStack(nn.Module):
    """Embeddings (word * embed_scale + learned position, layernorm_embedding, dropout) + layers."""

    def __init__(self, config: BartConfig, layer_cls, num_layers: int, layerdrop: float):
        super().__init__()
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings, d)
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(num_layers))
        self.layernorm_embedding = nn.LayerNorm(d)
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.dropout_p, self.layerdrop = config.dropout, layerdrop
        self.d_model, self.max_positions = d, config.max_position_embeddings
        self.gradient_checkpointing = False

    def _embed(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], position_ids: Tensor) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)                                # (B, L, E)
            if self.embed_scale != 1.0:
                inputs_embeds = inputs_embeds * self.embed_scale
        pos = self.embed_positions(position_ids)                                        # (B or 1, L, E)
        ln = self.layernorm_embedding
        x, _ = fl.layer_norm(pos.expand_as(inputs_embeds), ln.weight, ln.bias, ln.eps, residual=inputs_embeds)
        return _dropout(x, self.dropout_p, self.training)

    def _inputs(self, input_ids, inputs_embeds, attention_mask, what: str):
        """-> (key_padding_mask (B, L) bool or None, position_ids (1, L)), every argument checked."""
        ids_name, embeds_name, mask_name = (("input_ids", "inputs_embeds", "attention_mask") if what == "encoder"
                                            else ("decoder_input_ids", "decoder_inputs_embeds",
                                                  "decoder_attention_mask"))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{ids_name} / {embeds_name}: pass exactly one of them, got "
                             + ("both" if input_ids is not None else "neither"))
        if input_ids is not None:
            _check_ids(ids_name, input_ids, 2)
            (B, L), device = input_ids.shape, input_ids.device
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.d_model:
                raise ValueError(f"{embeds_name}: expected (B, L, {self.d_model}), got {tuple(inputs_embeds.shape)}")
            (B, L), device = inputs_embeds.shape[:2], inputs_embeds.device
        if L > self.max_positions:
            raise ValueError(f"{ids_name}: sequence length {L} exceeds max_position_embeddings="
                             f"{self.max_positions}; truncate the input")
        mask = padding_mask(attention_mask, B, L, mask_name, device)
        return mask, torch.arange(L, device=device)[None]

    def _layer_dropped(self) -> bool:
        # transformers' LayerDrop: one torch.rand([]) per layer, in training only
        return self.training and self.layerdrop > 0 and bool(torch.rand([]) < self.layerdrop)

    def _run(self, layer, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class BartEncoder(_BartStack):
    def __init__(self, config: BartConfig):
        super().__init__(config, BartEncoderLayer, config.encoder_layers, config.encoder_layerdrop)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: Optional[bool] = None):
        """-> BaseModelOutput: last_hidden_state (B, Ls, E); hidden_states (embeddings + each layer)
        and attentions (B, H, Ls, Ls) per layer when asked."""
        mask, positions = self._inputs(input_ids, inputs_embeds, attention_mask, "encoder")
        x = self._embed(input_ids, inputs_embeds, positions)
        hidden, attns = ((x,) if output_hidden_states else None), (() if output_attentions else None)
        for layer in self.layers:
            if self._layer_dropped():
                continue
            x, probs = self._run(layer, x, mask, output_attentions)
            if output_hidden_states:
                hidden += (x,)
            if output_attentions:
                attns += (probs,)
        return maybe_tuple(BaseModelOutput(x, hidden, attns), return_dict)


class BartDecoder(_BartStack):
    def __init__(self, config: BartConfig):
        super().__init__(config, BartDecoderLayer, config.decoder_layers, config.decoder_layerdrop)

    def forward(self, input_ids: Optional[Tensor], attention_mask: Optional[Tensor], encoder_hidden: Tensor,
                encoder_mask: Optional[Tensor], inputs_embeds: Optional[Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False):
        """-> (last hidden (B, Lt, E), hidden states, self-attention probs, cross-attention probs)."""
        mask, positions = self._inputs(input_ids, inputs_embeds, attention_mask, "decoder")
        x = self._embed(input_ids, inputs_embeds, positions)
        hidden = (x,) if output_hidden_states else None
        attns, cross = (() if output_attentions else None), (() if output_attentions else None)
        for layer in self.layers:
            if self._layer_dropped():
                continue
            x, p_self, p_cross = self._run(layer, x, mask, encoder_hidden, encoder_mask, output_attentions)
            if output_hidden_states:
                hidden += (x,)
            if output_attentions:
                attns, cross = attns + (p_self,), cross + (p_cross,)
        return x, hidden, attns, cross


# ------------------------------------------------------------------------------------ models
class BartPreTrainedModel(PreTrainedModel):
    config_class = BartConfig
    base_model_prefix = "model"
    ignored_keys = (r"(^|\.)position_ids$", r"(^|\.)(encoder|decoder)\.version$")   # fairseq-era buffers

    def _init_weights(self, module: nn.Module) -> None:
        init_normal_(module, self.config.init_std)
        if isinstance(module, BartForConditionalGeneration):
            module.final_logits_bias.zero_()

    def get_encoder(self) -> BartEncoder:
        return self._bart().encoder

    def get_decoder(self) -> BartDecoder:
        return self._bart().decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self._bart().shared

    def _bart(self) -> "BartModel":
        return self if isinstance(self, BartModel) else self.model


_BODY_TIES = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}


class BartModel(BartPreTrainedModel):
    """Encoder + decoder over `shared` word embeddings."""
    tied_keys = dict(_BODY_TIES)

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = BartEncoder(config)
        self.decoder = BartDecoder(config)
        self._post_init()

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None,
                encoder_outputs=None, inputs_embeds: Optional[Tensor] = None,
                decoder_inputs_embeds: Optional[Tensor] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: Optional[bool] = None):
        """input_ids (B, Ls) int or inputs_embeds (B, Ls, E) (or encoder_outputs: a BaseModelOutput or
        tuple whose [0] is the encoder's last hidden state); attention_mask (B, Ls), 1 = token,
        0 = padding (any side); decoder_input_ids (B, Lt) (default: input_ids shifted right from
        decoder_start_token_id, as transformers) or decoder_inputs_embeds; decoder_attention_mask
        (B, Lt) padding on top of the causal mask.
        Returns Seq2SeqModelOutput: last_hidden_state (B, Lt, E), encoder_last_hidden_state
        (B, Ls, E); with output_hidden_states encoder_hidden_states / decoder_hidden_states
        (embeddings + each layer); with output_attentions encoder_attentions, decoder_attentions
        (B, H, L, L) and cross_attentions (B, H_dec, Lt, Ls) per layer.
        Raises ValueError naming a bad argument."""
        cfg = self.config
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("decoder_input_ids: without decoder_input_ids or decoder_inputs_embeds the decoder "
                                 "inputs are input_ids shifted right, but input_ids is None")
            _check_ids("input_ids", input_ids, 2)
            decoder_input_ids = shift_tokens_right(input_ids, cfg.pad_token_id, cfg.decoder_start_token_id)
        enc_mask = None
        if encoder_outputs is None:
            src = input_ids if input_ids is not None else inputs_embeds
            if src is not None and src.dim() >= 2:  # (else the encoder raises, naming the argument)
                # the encoder's key_padding_mask once (an unpadded batch: None, no second host read)
                attention_mask = enc_mask = padding_mask(attention_mask, *src.shape[:2], "attention_mask",
                                                         src.device)
            encoder_outputs = self.encoder(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                           output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            t = tuple(encoder_outputs)
            encoder_outputs = BaseModelOutput(t[0], t[1] if len(t) > 1 else None, t[2] if len(t) > 2 else None)
        enc = encoder_outputs.last_hidden_state                                         # (B, Ls, E)
        if enc_mask is None:  # given encoder_outputs (or no padding): the encoder's (B, Ls) mask checked here
            enc_mask = padding_mask(attention_mask, *enc.shape[:2], "attention_mask", enc.device)
        x, hidden, attns, cross = self.decoder(decoder_input_ids, decoder_attention_mask, enc, enc_mask,
                                               inputs_embeds=decoder_inputs_embeds,
                                               output_attentions=output_attentions,
                                               output_hidden_states=output_hidden_states)
        out = Seq2SeqModelOutput(x, hidden, attns, cross, enc, encoder_outputs.hidden_states,
                                 encoder_outputs.attentions)
        return maybe_tuple(out, return_dict)


def _head_ties(**extra) -> dict:
    return {**{"model." + k: "model." + v for k, v in _BODY_TIES.items()}, **extra}


def _body_kwargs(kw: dict) -> dict:
    return {k: kw[k] for k in ("attention_mask", "decoder_input_ids", "decoder_attention_mask", "encoder_outputs",
                               "inputs_embeds", "decoder_inputs_embeds", "output_attentions",
                               "output_hidden_states")}


class BartForConditionalGeneration(BartPreTrainedModel, GenerationMixin):
    """BART + lm_head (tied to `shared`) + `final_logits_bias` (1, V), a buffer (zeros when the
    checkpoint lacks it, as transformers). labels (B, Lt) int, -100 ignored: loss = mean
    cross-entropy; without decoder inputs they are labels shifted right from
    decoder_start_token_id. logits (B, Lt, V) in the model's dtype."""
    tied_keys = _head_ties(**{"lm_head.weight": "model.shared.weight"})
    is_encoder_decoder = True

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self.model = BartModel(config)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _match(self, ckpt: dict, ignore_mismatched_sizes: bool, where: str):
        if "final_logits_bias" not in ckpt:        # transformers: zeros, not reported as missing
            ckpt = {**ckpt, "final_logits_bias": torch.zeros(1, self.config.vocab_size)}
        return super()._match(ckpt, ignore_mismatched_sizes, where)

    def _logits(self, x: Tensor) -> Tensor:
        return fl.linear(x, self.lm_head.weight, self.final_logits_bias[0])

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                output_attentions=False, output_hidden_states=False, return_dict=None):
        """As BartModel.forward, plus labels; returns Seq2SeqLMOutput (loss, logits, ...)."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        out = self.model(input_ids, **_body_kwargs(locals()))
        logits = self._logits(out.last_hidden_state)                                    # (B, Lt, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device))
        return maybe_tuple(Seq2SeqLMOutput(loss, logits, out.decoder_hidden_states, out.decoder_attentions,
                                           out.cross_attentions, out.encoder_last_hidden_state,
                                           out.encoder_hidden_states, out.encoder_attentions), return_dict)

    # ------------------------------------------------------------------ generation hooks
    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def _encode(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """Encoder inputs (B_enc, Ls) -> encoder last hidden state (B_enc, Ls, E)."""
        return self.model.encoder(input_ids, attention_mask=attention_mask).last_hidden_state

    def _new_cache(self, batch: int, max_len: int, encoder_len: Optional[int] = None,
                   num_beams: int = 1) -> StaticKVCache:
        """A decoder self-attention cache for `batch` = B_enc * num_beams rows (beam-major) of up to
        max_len tokens, with `num_beams`, `cross_k` / `cross_v` (per layer, (B_enc, Ls, H, D)) and
        `cross_mask` ((B_enc, Ls) bool, True = token). With encoder_len the cross buffers are
        allocated now and fixed (addresses a captured CUDA graph keeps); without, at the first
        _prefill_cross."""
        c = self.config
        if not isinstance(num_beams, int) or num_beams < 1 or batch % num_beams:
            raise ValueError(f"num_beams: expected an int >= 1 dividing batch={batch}, got {num_beams!r}")
        cache = StaticKVCache(c.decoder_layers, batch, max_len, c.decoder_attention_heads,
                              c.d_model // c.decoder_attention_heads, self.dtype, self.device)
        cache.num_beams, cache.encoder_len = num_beams, encoder_len
        cache.cross_k = cache.cross_v = cache.cross_mask = None
        if encoder_len is not None:
            _alloc_cross(cache, batch // num_beams, encoder_len)
        return cache

    @torch.no_grad()
    def _prefill_cross(self, encoder_hidden: Tensor, encoder_attention_mask: Optional[Tensor],
                       cache: StaticKVCache) -> None:
        """Every decoder layer's cross-attention K/V of encoder_hidden (B_enc, Ls, E), and the padding
        mask (B_enc, Ls) (None: all tokens), written into the cache's buffers in place."""
        B_enc, Ls, _ = encoder_hidden.shape
        if B_enc * cache.num_beams != cache.batch:
            raise ValueError(f"encoder_hidden: {B_enc} rows x num_beams={cache.num_beams} != the cache's "
                             f"{cache.batch} rows")
        if cache.cross_k is None or cache.cross_mask.shape != (B_enc, Ls):
            if cache.encoder_len is not None:
                raise ValueError(f"encoder_hidden: the cache was made for (B_enc, Ls) = "
                                 f"{(cache.batch // cache.num_beams, cache.encoder_len)}, got {(B_enc, Ls)}")
            _alloc_cross(cache, B_enc, Ls)
        for i, layer in enumerate(self.model.decoder.layers):
            k, v = layer.encoder_attn.project_kv(encoder_hidden)                          # (B_enc, Ls, H, D)
            cache.cross_k[i].copy_(k)
            cache.cross_v[i].copy_(v)
        if encoder_attention_mask is None:
            cache.cross_mask.fill_(True)
        else:
            if tuple(encoder_attention_mask.shape) != (B_enc, Ls):
                raise ValueError(f"encoder_attention_mask: expected (B_enc, Ls) = {(B_enc, Ls)}, got "
                                 f"{tuple(encoder_attention_mask.shape)}")
            cache.cross_mask.copy_(encoder_attention_mask.bool())

    @torch.no_grad()
    def _decode_step(self, input_ids: Tensor, position_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One decoder token per row (N, 1) at decoder positions position_ids (N, 1) (0 = the start
        token) -> logits (N, V) float32. Writes each layer's k/v at cache.seqlens (not advanced)."""
        dec = self.model.decoder
        x = dec._embed(input_ids, None, position_ids)                                     # (N, 1, E)
        for i, layer in enumerate(dec.layers):
            x = layer.decode(x, cache, i)
        return self._logits(x[:, -1]).float()


def _alloc_cross(cache: StaticKVCache, B_enc: int, Ls: int) -> None:
    H, D = cache.k[0].shape[2:]
    like = cache.k[0]
    cache.cross_k = [like.new_zeros(B_enc, Ls, H, D) for _ in cache.k]
    cache.cross_v = [like.new_zeros(B_enc, Ls, H, D) for _ in cache.k]
    cache.cross_mask = torch.ones(B_enc, Ls, dtype=torch.bool, device=like.device)


class BartClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj (transformers' names)."""

    def __init__(self, config: BartConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.classifier_dropout or 0.0)
        self.out_proj = nn.Linear(config.d_model, config.num_labels)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(fl.linear(self.dropout(x), self.dense.weight, self.dense.bias))
        return fl.linear(self.dropout(x), self.out_proj.weight, self.out_proj.bias)


class BartForSequenceClassification(BartPreTrainedModel):
    """BART + a classification head on the decoder state at each row's last eos token of input_ids
    (every row must hold the same number >= 1 of eos tokens, as transformers requires; the check
    reads the counts on the host). logits (B, num_labels); labels and loss as
    BertForSequenceClassification (problem_type rules)."""
    tied_keys = _head_ties()

    def __init__(self, config: BartConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = BartModel(config)
        self.classification_head = BartClassificationHead(config)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                output_attentions=False, output_hidden_states=False, return_dict=None):
        if input_ids is None:
            raise ValueError("input_ids: BartForSequenceClassification pools at the eos tokens of input_ids, "
                             "so input_ids is required (inputs_embeds alone is not supported, as in transformers)")
        eos = self.config.eos_token_id
        if not isinstance(eos, int):
            raise ValueError(f"eos_token_id: the classification head needs one eos id (an int), got {eos!r}")
        out = self.model(input_ids, **_body_kwargs(locals()))
        h = out.last_hidden_state                                                        # (B, Lt, E)
        B, Lt = h.shape[:2]
        if tuple(input_ids.shape) != (B, Lt):
            raise ValueError(f"input_ids: pooling reads the decoder output at input_ids' eos positions, so the "
                             f"decoder length must equal input_ids', got {tuple(input_ids.shape)} vs {(B, Lt)}")
        eos_mask = input_ids.to(h.device) == eos
        counts = eos_mask.sum(1)
        lo, hi = torch.stack(torch.aminmax(counts)).tolist()      # one host read
        if lo != hi:
            raise ValueError(f"input_ids: all examples must have the same number of <eos> tokens "
                             f"(eos_token_id={eos}), got counts from {lo} to {hi}")
        if lo < 1:
            raise ValueError(f"input_ids: each example must contain at least one <eos> token (eos_token_id={eos})")
        idx = torch.arange(Lt, device=h.device)
        last = (idx * eos_mask).argmax(-1)                                               # (B,) last eos
        logits = self.classification_head(h[torch.arange(B, device=h.device), last])     # (B, num_labels)
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config)
        return maybe_tuple(Seq2SeqSequenceClassifierOutput(loss, logits, out.decoder_hidden_states,
                                                           out.decoder_attentions, out.cross_attentions,
                                                           out.encoder_last_hidden_state, out.encoder_hidden_states,
                                                           out.encoder_attentions), return_dict)
