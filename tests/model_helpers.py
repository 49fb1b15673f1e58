"""Shared pieces of the model tests: tiny transformers configs, perturbed random weights, padded
inputs, and comparisons on non-padded positions.

Reference models are transformers' own (eager attention, so `attentions` exist), with every
weight perturbed after transformers' init: LayerNorm weights away from 1 and every bias away from
0, so a parameter that is loaded into the wrong place, or not at all, changes the numbers.
"""
from __future__ import annotations

import torch
import transformers as hf

from helpers import max_err

# Tiny configs that differ in every field the architecture reads. head_dim 8 / 12 / 4 / 7 / 40:
# powers of two and not; type_vocab_size 1, 2, 3; a layer_norm_eps large enough (1e-3) that
# ignoring it would show; max_position_embeddings just above the test's sequence length.
CONFIGS = {
    "h24-3x8-gelu": dict(vocab_size=50, hidden_size=24, num_attention_heads=3, num_hidden_layers=2,
                         intermediate_size=37, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
                         max_position_embeddings=20),
    "h36-3x12-gelu_new": dict(vocab_size=97, hidden_size=36, num_attention_heads=3, num_hidden_layers=1,
                              intermediate_size=64, type_vocab_size=3, layer_norm_eps=1e-3,
                              hidden_act="gelu_new", max_position_embeddings=13),
    "h16-4x4-relu": dict(vocab_size=31, hidden_size=16, num_attention_heads=4, num_hidden_layers=3,
                         intermediate_size=20, type_vocab_size=1, layer_norm_eps=1e-5, hidden_act="relu",
                         max_position_embeddings=12),
    "h35-5x7-tanh": dict(vocab_size=64, hidden_size=35, num_attention_heads=5, num_hidden_layers=2,
                         intermediate_size=33, type_vocab_size=2, layer_norm_eps=1e-6,
                         hidden_act="gelu_pytorch_tanh", max_position_embeddings=11),
}

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(name: str = "h24-3x8-gelu", **overrides) -> hf.BertConfig:
    kw = dict(CONFIGS[name])
    kw.update(overrides)
    cfg = hf.BertConfig(**kw)
    cfg._attn_implementation = "eager"     # transformers' eager path returns `attentions`
    return cfg


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Adds noise to every parameter: LayerNorm weights leave 1, biases leave 0."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    return model


def hf_model(cls, cfg, perturb: bool = True):
    """A transformers model (eval mode) with perturbed random weights."""
    m = cls(cfg)
    if perturb:
        perturb_(m)
    return m.eval()


def padding_mask(B: int, L: int) -> torch.Tensor:
    """(B, L) int64, 1 = token: row 0 full, row 1 right-padded, row 2 left-padded, row 3 one token
    (right-padded), further rows right-padded at random lengths."""
    m = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        m[1, L - max(1, L // 3):] = 0
    if B > 2:
        m[2, :max(1, L // 2)] = 0
    if B > 3:
        m[3, 1:] = 0
    for b in range(4, B):
        m[b, int(torch.randint(1, L + 1, ())):] = 0
    return m


def make_inputs(cfg, B: int = 4, L: int = 9, *, types: bool = True, positions: bool = False,
                mask: bool = True) -> dict:
    """Random inputs for both libraries (same keywords)."""
    L = min(L, cfg.max_position_embeddings)
    kw = {"input_ids": torch.randint(0, cfg.vocab_size, (B, L))}
    if mask:
        kw["attention_mask"] = padding_mask(B, L)
    if types:
        kw["token_type_ids"] = torch.randint(0, cfg.type_vocab_size, (B, L))
    if positions:
        kw["position_ids"] = torch.randint(0, cfg.max_position_embeddings, (B, L))
    return kw


def token_mask(inputs: dict) -> torch.Tensor:
    """(B, L) bool of the non-padded positions (all True without an attention_mask)."""
    m = inputs.get("attention_mask")
    if m is None:
        ref = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"][..., 0]
        return torch.ones(ref.shape, dtype=torch.bool)
    return m.bool()


def assert_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str, mask=None, atol: float = 0.0):
    """max |out - ref| <= rtol * max(|ref|) + atol over the masked positions (mask: leading dims)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    if mask is not None:
        out, ref = out[mask], ref[mask]
    assert not torch.isnan(out).any(), f"{what}: NaN"
    assert ref.abs().max() > 0, f"{what}: reference is all zeros, the comparison would prove nothing"
    err = max_err(out, ref)
    tol = rtol * ref.abs().max().item() + atol
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e} (max |ref| {ref.abs().max().item():.3e})"


def grads_by_checkpoint_name(model) -> dict:
    """{checkpoint key: grad} of a fastlayers model: fused tensors' grads split into their parts
    (query/key/value) through the same mapping state_dict() uses."""
    from fastlayers.models.layers import split_fused
    grads = {k: p.grad for k, p in model.named_parameters(remove_duplicate=False)}
    return split_fused(model, grads)


def hf_grads(model) -> dict:
    return {k: p.grad for k, p in model.named_parameters(remove_duplicate=False)}


def assert_grads_match(ref, model, rtol: float) -> None:
    """After backward on both: the fastlayers model's gradients (by checkpoint name) against
    transformers' -- the same names, shapes (the state_dict's), values within rtol. Gradients zero in
    exact arithmetic (a key bias: softmax ignores a shift shared by all keys; multiple choice's
    classifier bias) are fp32 noise on both sides, so each tensor gets an absolute floor of 1e-6 of
    the model's largest gradient; a tensor transformers gives no gradient (a pooler the head does
    not use) must have none or zeros."""
    g_ref, g = hf_grads(ref), grads_by_checkpoint_name(model)
    assert sorted(g) == sorted(g_ref), "parameter names differ from transformers'"
    sd = model.state_dict()
    scale = max(v.abs().max().item() for v in g_ref.values() if v is not None)
    for k in sorted(g_ref):
        if g_ref[k] is None:
            assert g[k] is None or not g[k].any(), f"{k}: gradient where transformers has none"
            continue
        assert g[k] is not None, f"{k}: no gradient"
        assert g[k].shape == sd[k].shape == g_ref[k].shape, f"{k}: gradient shape {tuple(g[k].shape)}"
        if not g_ref[k].any():   # exactly zero there (rounding happened to cancel): ours within the floor
            assert g[k].abs().max() <= 1e-6 * scale, f"grad {k}: {g[k].abs().max():.3e} where transformers has 0"
            continue
        assert_rel(g[k], g_ref[k], rtol, f"grad {k}", atol=1e-6 * scale)


def assert_trains_like(ref, model, inputs: dict, labels: dict, rtol: float, lr: float, steps: int = 5) -> None:
    """`steps` SGD steps at `lr` on one batch for both models (llm.c's test_gpt2 in small): the
    reference trains (its loss falls by more than 0.05) and each step's loss is within rtol of it."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses_ref, losses = [], []
    for _ in range(steps):
        for m, o, acc in ((ref, opt_ref, losses_ref), (model, opt, losses)):
            o.zero_grad()
            loss = m(**inputs, **labels).loss
            loss.backward()
            o.step()
            acc.append(loss.item())
    assert losses_ref[-1] < losses_ref[0] - 0.05, f"the reference did not train: {losses_ref}"
    for i, (a, b) in enumerate(zip(losses, losses_ref)):
        assert abs(a - b) <= rtol * abs(b), f"step {i}: loss {a} != transformers' {b} ({losses} vs {losses_ref})"


def assert_layers_match(ours, ref, rtol: float, mask, num_layers: int) -> None:
    """hidden_states (num_layers + 1) and attentions (num_layers) as transformers' give them: the
    hidden states at the non-padded positions (mask (B, L)); the probabilities (B, nh, Lq, Lk) ->
    (B, Lq, nh, Lk) as rows of the non-padded queries over all keys (padded and future keys must be 0
    in both)."""
    assert ours.hidden_states is not None and ours.attentions is not None
    assert len(ours.hidden_states) == len(ref.hidden_states) == num_layers + 1
    assert len(ours.attentions) == len(ref.attentions) == num_layers
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert_rel(a, b, rtol, f"hidden_states[{i}]", mask=mask)
    for i, (a, b) in enumerate(zip(ours.attentions, ref.attentions)):
        assert_rel(a.transpose(1, 2), b.transpose(1, 2), rtol, f"attentions[{i}]", mask=mask)


def gpu_backend_or_skip(backend: str) -> None:
    """Skips the test when fastlayers' `backend` cannot run here, with fl.available_backends()' reason."""
    import fastlayers as fl
    import pytest
    info = fl.available_backends()[backend]
    if not info["available"]:
        pytest.skip(f"{backend} backend unavailable: {info['reason']}")


def assert_loss_and_grads_match(ref, model, loss_ref, loss, rtol: float) -> None:
    """The two models' losses within rtol, then both backwards and assert_grads_match."""
    assert_rel(loss, loss_ref, rtol, "loss")
    loss_ref.backward()
    loss.backward()
    assert_grads_match(ref, model, rtol)


def assert_unsupported_field_raises(folder, fl_cls, config_cls, field: str, value) -> None:
    """`field: value` written into folder/config.json: from_pretrained and the config class itself
    raise ConfigError naming the field."""
    import json
    import pytest
    from fastlayers.models import ConfigError
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        fl_cls.from_pretrained(folder)
    with pytest.raises(ConfigError, match=field):
        config_cls(**{field: value})
