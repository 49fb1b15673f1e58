"""Shared pieces of the GPT-2 and generation tests: tiny transformers GPT-2 configs, perturbed
checkpoints saved by transformers, padded batches, and transformers' greedy ids with a check that
they are well-conditioned (no near-tie between the two best tokens, which a 1e-6 difference of the
two implementations could flip).

Comparisons reuse model_helpers (assert_rel, perturb_, gradients by checkpoint name); nothing
here is BERT-specific and nothing in model_helpers is changed.
"""
from __future__ import annotations

import torch
import transformers as hf

from model_helpers import perturb_

# Tiny configs that differ in every field the architecture reads. head_dim 8 / 12 / 4 / 7: powers
# of two and not; n_inner None (4 * n_embd) and explicit, odd; layer_norm_epsilon large enough
# (1e-3) that ignoring it would show; n_positions just above the test's sequence length; each
# scaling flag on somewhere (scale_attn_weights=False changes the scores by sqrt(head_dim)).
CONFIGS = {
    "e24-3x8-gelu_new": dict(vocab_size=61, n_embd=24, n_head=3, n_layer=2, n_positions=24, n_inner=None,
                             layer_norm_epsilon=1e-5, activation_function="gelu_new"),
    "e36-3x12-gelu-invlayer": dict(vocab_size=97, n_embd=36, n_head=3, n_layer=2, n_positions=13, n_inner=50,
                                   layer_norm_epsilon=1e-3, activation_function="gelu",
                                   scale_attn_by_inverse_layer_idx=True),
    "e16-4x4-relu-noscale": dict(vocab_size=31, n_embd=16, n_head=4, n_layer=3, n_positions=12, n_inner=20,
                                 layer_norm_epsilon=1e-6, activation_function="relu", scale_attn_weights=False),
    "e35-5x7-tanh-upcast": dict(vocab_size=64, n_embd=35, n_head=5, n_layer=2, n_positions=11, n_inner=None,
                                layer_norm_epsilon=1e-5, activation_function="gelu_pytorch_tanh",
                                reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True),
}

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
PAD = 0          # pad_token_id of the tests' checkpoints: never drawn as a prompt token


def hf_config(name: str = "e24-3x8-gelu_new", **overrides) -> hf.GPT2Config:
    # bos/eos inside the vocabulary (GPT-2's default 50256 is not); dropout 0 unless asked
    kw = dict(CONFIGS[name], bos_token_id=None, eos_token_id=None, **NO_DROPOUT)
    kw.update(overrides)
    cfg = hf.GPT2Config(**kw)
    cfg._attn_implementation = "eager"     # transformers' eager path returns `attentions`
    return cfg


def checkpoint(directory, hf_cls, cfg, scale: float = 0.2):
    """A transformers model with perturbed random weights (LayerNorm off 1, biases off 0), saved
    with transformers' save_pretrained into `directory`. Returns the model in eval mode."""
    ref = hf_cls(cfg)
    perturb_(ref, scale)
    ref.save_pretrained(directory)
    return ref.eval()


def padding_mask(B: int, L: int) -> torch.Tensor:
    """(B, L) int64, 1 = token: row 0 full, row 1 right-padded, row 2 left-padded, row 3 one token
    (right-padded), row 4 one token (left-padded), further rows full."""
    m = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        m[1, L - max(1, L // 3):] = 0
    if B > 2:
        m[2, :max(1, L // 2)] = 0
    if B > 3:
        m[3, 1:] = 0
    if B > 4:
        m[4, :-1] = 0
    return m


def make_inputs(cfg, B: int = 5, L: int = 9, *, mask: bool = True, types: bool = False,
                positions: bool = False) -> dict:
    """Random ids in [1, vocab) (PAD = 0 at padded positions), for both libraries (same keywords)."""
    L = min(L, cfg.n_positions)
    ids = torch.randint(1, cfg.vocab_size, (B, L))
    kw = {"input_ids": ids}
    if mask:
        m = padding_mask(B, L)
        kw["input_ids"] = ids.masked_fill(m == 0, PAD)
        kw["attention_mask"] = m
    if types:
        kw["token_type_ids"] = torch.randint(0, cfg.vocab_size, (B, L))
    if positions:
        kw["position_ids"] = torch.randint(0, cfg.n_positions, (B, L))
    return kw


def left_padded(lengths, vocab: int, pad: int = PAD):
    """Prompts of the given lengths, left-padded as a tokenizer with padding_side='left' does:
    (ids (B, P), attention_mask (B, P)), P = max(lengths); prompt tokens in [1, vocab)."""
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(1, vocab, (n,))
        mask[b, P - n:] = 1
    return ids, mask


def finished_steps(new_tokens: torch.Tensor, eos) -> list:
    """Per row, the 0-based step whose token is the first eos (None: never)."""
    eos = [eos] if isinstance(eos, int) else list(eos)
    out = []
    for row in new_tokens.tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        out.append(hits[0] if hits else None)
    return out


MIN_MARGIN = 1e-4   # >> the ~1e-6 logit differences of two fp32 implementations


@torch.no_grad()
def hf_generate(ref, input_ids, attention_mask=None, **kw) -> torch.Tensor:
    """transformers' greedy generate (do_sample=False), checked to be well-conditioned: at every
    step of every unfinished row the best processed score beats the second by MIN_MARGIN, so an
    implementation within 1e-5 must pick the same token. Returns the sequences (B, P + new)."""
    kw.setdefault("do_sample", False)
    out = ref.generate(input_ids, attention_mask=attention_mask, return_dict_in_generate=True,
                       output_scores=True, **kw)
    seq = out.sequences
    P = input_ids.shape[1]
    eos = kw.get("eos_token_id", ref.generation_config.eos_token_id)
    fin = finished_steps(seq[:, P:], eos if eos is not None else [])
    for t, scores in enumerate(out.scores):                       # (B, V) after the processors
        top2 = scores.float().topk(2, dim=-1).values
        for b in range(scores.shape[0]):
            if fin[b] is not None and t > fin[b]:
                continue                                          # finished: pad_token_id, scores unused
            a, c = top2[b].tolist()
            if a == float("-inf") or c == float("-inf"):
                continue                                          # one allowed token (or none): no tie
            assert a - c >= MIN_MARGIN, (f"ill-conditioned test: row {b} step {t} best two scores {a} and {c} "
                                         "nearly tie; change the prompt or the seed")
    return seq
