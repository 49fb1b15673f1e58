"""BERT on fastlayers ops, named like Hugging Face checkpoints (transformers' modeling_bert).

Every linear, norm and attention runs through fl.linear / fl.layer_norm / fl.attention, so
`fl.use_backend(...)` switches the whole model:
  - one QKV GEMM (FusedLinear; the checkpoint's query/key/value are split back at save);
  - GELU fused into the intermediate dense;
  - the residual add fused into the output dense (eval, or no hidden dropout) or into the
    layer norm (training with dropout: LayerNorm(dropout(dense(x)) + residual));
  - padding through `key_padding_mask` (HF attention_mask (B, L), 1 = token, 0 = padding).
Dropout follows the config in train() (attention dropout inside the fused kernel) and is off in
eval(). Shapes: input_ids (B, L) int64; hidden states (B, L, H) in the parameters' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastlayers as fl

from .config import ACTIVATION_OF, BertConfig
from .layers import FusedLinear, padding_mask
from .loading import PreTrainedModel, init_normal_
from .outputs import (BaseModelOutputWithPooling, MaskedLMOutput, MultipleChoiceModelOutput,
                      QuestionAnsweringModelOutput, SequenceClassifierOutput, TokenClassifierOutput,
                      maybe_tuple)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)                      # (B, L, H)
        x = inputs_embeds + self.token_type_embeddings(token_type_ids)
        # LayerNorm((word + type) + position): the last add fused into the norm (a + b is exact either way)
        x, _ = fl.layer_norm(self.position_embeddings(position_ids).expand_as(x), self.LayerNorm.weight,
                             self.LayerNorm.bias, self.LayerNorm.eps, residual=x)
        return _dropout(x, self.dropout_p, self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        h = config.hidden_size
        self.qkv = FusedLinear(h, {"query": h, "key": h, "value": h})
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor], output_attentions: bool):
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)            # (B, L, 3, nh, D)
        q, k, v = qkv.unbind(2)                                                     # (B, L, nh, D) views
        p = self.dropout_p if self.training else 0.0
        ctx = fl.attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=p)  # (B, L, nh, D)
        probs = None
        if output_attentions:
            if p > 0:
                raise ValueError("output_attentions: the fused kernel draws attention dropout inside; "
                                 "call model.eval() (or set attention_probs_dropout_prob=0) to get the "
                                 "probabilities")
            probs = attention_probs(q, k, key_padding_mask)
        return ctx.reshape(B, L, -1), probs


def attention_probs(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], causal: bool = False,
                    scale: Optional[float] = None) -> Tensor:
    """softmax(scale * q k^T) with padded (and, if causal, future) keys masked, (B, nh, Lq, Lk):
    transformers' eager `attentions`, computed apart from the fused kernel, which never
    materialises it. scale defaults to 1/sqrt(D)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (q.shape[-1] ** -0.5 if scale is None else scale)
    lo = torch.finfo(s.dtype).min
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], lo)
    if causal:
        Lq, Lk = s.shape[-2:]
        future = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(Lk - Lq + 1)
        s = s.masked_fill(future, lo)
    return s.softmax(-1).to(q.dtype)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        """LayerNorm(dropout(dense(h)) + residual); the add fused into the GEMM or the norm."""
        ln = self.LayerNorm
        if self.training and self.dropout_p > 0:
            y = _dropout(fl.linear(h, self.dense.weight, self.dense.bias), self.dropout_p, True)
            return fl.layer_norm(y, ln.weight, ln.bias, ln.eps, residual=residual)[0]
        y = fl.linear(h, self.dense.weight, self.dense.bias, residual=residual)
        return fl.layer_norm(y, ln.weight, ln.bias, ln.eps)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, key_padding_mask, output_attentions):
        ctx, probs = self.self(x, key_padding_mask, output_attentions)
        return self.output(ctx, x), probs


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATION_OF[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return fl.linear(x, self.dense.weight, self.dense.bias, activation=self.activation)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, key_padding_mask, output_attentions):
        a, probs = self.attention(x, key_padding_mask, output_attentions)
        return self.output(self.intermediate(a), a), probs


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, key_padding_mask, output_hidden_states, output_attentions):
        hidden, attns = ((x,) if output_hidden_states else None), (() if output_attentions else None)
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                x, probs = checkpoint(layer, x, key_padding_mask, output_attentions, use_reentrant=False)
            else:
                x, probs = layer(x, key_padding_mask, output_attentions)
            if output_hidden_states:
                hidden = hidden + (x,)
            if output_attentions:
                attns = attns + (probs,)
        return x, hidden, attns


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(fl.linear(x[:, 0], self.dense.weight, self.dense.bias))   # (B, H)


class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"
    optional_keys = (r"^pooler\.",)

    def _init_weights(self, module: nn.Module) -> None:
        init_normal_(module, self.config.initializer_range)
        if isinstance(module, BertLMPredictionHead):
            module.bias.zero_()

class BertModel(BertPreTrainedModel):
    """The BERT encoder: embeddings, layers and (add_pooling_layer) the tanh pooler on [CLS]."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, return_dict: Optional[bool] = None):
        """input_ids (B, L) int, or inputs_embeds (B, L, H); attention_mask (B, L), 1/True = token,
        0/False = padding; token_type_ids, position_ids (B, L) int (defaults 0 and 0..L-1).
        Returns BaseModelOutputWithPooling: last_hidden_state (B, L, H), pooler_output (B, H) or
        None without a pooler, hidden_states (embeddings + each layer: num_hidden_layers + 1 tensors
        (B, L, H)) when output_hidden_states, attentions (num_hidden_layers tensors (B, nh, L, L))
        when output_attentions. Raises ValueError naming a bad argument."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: pass exactly one of them, got "
                             + ("both" if input_ids is not None else "neither"))
        if input_ids is not None:
            _check_ids("input_ids", input_ids, 2)
            B, L = input_ids.shape
            device = input_ids.device
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(f"inputs_embeds: expected (B, L, {cfg.hidden_size}), got {tuple(inputs_embeds.shape)}")
            B, L = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        if position_ids is None:
            if L > cfg.max_position_embeddings:
                raise ValueError(f"input_ids: sequence length {L} exceeds max_position_embeddings="
                                 f"{cfg.max_position_embeddings}; truncate the input")
            position_ids = torch.arange(L, device=device).expand(B, L)
        else:
            _check_ids("position_ids", position_ids, 2, (B, L), broadcast=True)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, L, dtype=torch.long, device=device)
        else:
            _check_ids("token_type_ids", token_type_ids, 2, (B, L), broadcast=True)
        key_padding_mask = padding_mask(attention_mask, B, L)
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        x, hidden, attns = self.encoder(x, key_padding_mask, output_hidden_states, output_attentions)
        pooled = self.pooler(x) if self.pooler is not None else None
        return maybe_tuple(BaseModelOutputWithPooling(x, pooled, hidden, attns), return_dict)


def _check_ids(name: str, t: Tensor, dim: int, shape=None, broadcast=False) -> None:
    if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{name}: expected an integer tensor, got "
                         f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        if not (broadcast and t.shape[0] == 1 and t.shape[1] == shape[1]):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


# ------------------------------------------------------------------------------------------ heads
class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACTIVATION_OF[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        x = fl.linear(x, self.dense.weight, self.dense.bias, activation=self.activation)
        return fl.layer_norm(x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias          # one tensor, two checkpoint names (as transformers)

    def forward(self, x: Tensor) -> Tensor:
        return fl.linear(self.transform(x), self.decoder.weight, self.bias)         # (B, L, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


def _base_kwargs(kw: dict) -> dict:
    return {k: kw[k] for k in ("attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                               "output_attentions", "output_hidden_states")}


class BertForMaskedLM(BertPreTrainedModel):
    """BERT + the masked-LM head (decoder tied to the word embeddings unless tie_word_embeddings is
    false). labels (B, L) int64, -100 = ignored -> loss = mean cross-entropy. logits (B, L, V)."""
    tied_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                 "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self._post_init()

    def _tied_active(self) -> dict:
        # the decoder bias is always the head's bias; the weight is tied only when the config says so
        keys = dict(self.tied_keys)
        if not getattr(self.config, "tie_word_embeddings", True):
            del keys["cls.predictions.decoder.weight"]
        return keys

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                return_dict=None):
        out = self.bert(input_ids, **_base_kwargs(locals()))
        logits = self.cls(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device))
        return maybe_tuple(MaskedLMOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


class BertForSequenceClassification(BertPreTrainedModel):
    """BERT + dropout + a linear on the pooled [CLS] state. logits (B, num_labels).
    labels: regression (num_labels == 1, or problem_type "regression"): float (B,) or (B, n), MSE;
    single-label: int (B,), cross-entropy; multi-label (float labels, or problem_type
    "multi_label_classification"): (B, n) in [0, 1], BCE with logits -- transformers' rules."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                return_dict=None):
        out = self.bert(input_ids, **_base_kwargs(locals()))
        logits = fl.linear(self.dropout(out.pooler_output), self.classifier.weight, self.classifier.bias)
        loss = None if labels is None else sequence_classification_loss(logits, labels, self.config)
        return maybe_tuple(SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


def sequence_classification_loss(logits: Tensor, labels: Tensor, config) -> Tensor:
    """transformers' problem_type rules (None -> inferred from num_labels and the labels' dtype)."""
    n = config.num_labels
    labels = labels.to(logits.device)
    kind = config.problem_type
    if kind is None:
        if n == 1:
            kind = "regression"
        elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            kind = "single_label_classification"
        else:
            kind = "multi_label_classification"
    if kind == "regression":
        if n == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().float())
        return F.mse_loss(logits.float(), labels.float())
    if kind == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, n).float(), labels.reshape(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class BertForTokenClassification(BertPreTrainedModel):
    """BERT + dropout + a per-token linear. logits (B, L, num_labels); labels (B, L) int, -100 ignored."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                return_dict=None):
        out = self.bert(input_ids, **_base_kwargs(locals()))
        logits = fl.linear(self.dropout(out.last_hidden_state), self.classifier.weight, self.classifier.bias)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1).to(logits.device))
        return maybe_tuple(TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions), return_dict)


class BertForQuestionAnswering(BertPreTrainedModel):
    """BERT + a per-token linear to (start, end) logits, each (B, L). start_positions /
    end_positions (B,) int: loss = mean of the two cross-entropies; positions outside the sequence
    are clamped to L and ignored (transformers' rule)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=False,
                output_hidden_states=False, return_dict=None):
        if self.num_labels != 2:
            raise ValueError(f"config.num_labels: question answering needs 2 (start, end), got {self.num_labels}")
        out = self.bert(input_ids, **_base_kwargs(locals()))
        logits = fl.linear(out.last_hidden_state, self.qa_outputs.weight, self.qa_outputs.bias)   # (B, L, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            s = start_positions.reshape(-1).to(logits.device).clamp(0, ignored)
            e = end_positions.reshape(-1).to(logits.device).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits.float(), s, ignore_index=ignored)
                    + F.cross_entropy(end_logits.float(), e, ignore_index=ignored)) / 2
        return maybe_tuple(QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states,
                                                        out.attentions), return_dict)


class BertForMultipleChoice(BertPreTrainedModel):
    """BERT over each (example, choice) pair, a linear on the pooled state. input_ids (B, C, L)
    (attention_mask, token_type_ids, position_ids alike; inputs_embeds (B, C, L, H)); logits (B, C);
    labels (B,) int: the right choice, cross-entropy."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=False, output_hidden_states=False,
                return_dict=None):
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None or ref.dim() < 3:
            raise ValueError("input_ids: expected (B, num_choices, L) (or inputs_embeds (B, num_choices, L, H)), got "
                             f"{None if ref is None else tuple(ref.shape)}")
        C = ref.shape[1]

        def flat(t):
            return None if t is None else t.reshape(-1, *t.shape[2:])
        out = self.bert(flat(input_ids), attention_mask=flat(attention_mask), token_type_ids=flat(token_type_ids),
                        position_ids=flat(position_ids), inputs_embeds=flat(inputs_embeds),
                        output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        logits = fl.linear(self.dropout(out.pooler_output), self.classifier.weight, self.classifier.bias)
        logits = logits.view(-1, C)                                                    # (B, C)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.reshape(-1).to(logits.device))
        return maybe_tuple(MultipleChoiceModelOutput(loss, logits, out.hidden_states, out.attentions), return_dict)
