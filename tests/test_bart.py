"""BART (fastlayers.models.bart) against Hugging Face transformers, whole model, llm.c style.

Each case builds a transformers BART on a tiny random config (CONFIGS: different encoder and
decoder depths, head counts (head_dim 8 / 6 / 12 / 4 / 7 / 5) and FFN sizes, scale_embedding on
and off, gelu / gelu_new / relu / gelu_pytorch_tanh), perturbs every weight (LayerNorm weights off
1, biases off 0, final_logits_bias off 0), saves it with transformers' `save_pretrained`, loads it
with fastlayers' `from_pretrained` and compares on non-padded positions of batches whose encoder
rows are full, right-padded, left-padded and one token, and (some modes) whose decoder rows are
padded too:
  - forward (eval, fp32): BartModel last/encoder hidden states, every hidden state and attention
    map (encoder, decoder, cross), BartForConditionalGeneration logits, BartForSequenceClassification
    logits within 1e-5 relative; with decoder inputs shifted from input_ids, inputs_embeds;
  - train() without dropout: loss and every parameter gradient (by checkpoint name) within 1e-4,
    then a few SGD steps' losses; LayerDrop draws as transformers; dropout follows train()/eval();
    gradient checkpointing gives the same gradients;
  - the details real checkpoints need, one test each: positions offset 2, scale_embedding,
    layernorm_embedding, the fp16 encoder clamp (through transformers' own fp16 CPU run, and the
    formula alone), final_logits_bias absent from a checkpoint;
  - save/load both ways, state_dict keys, tied and untied embeddings, config fields refused by name;
  - the generation hooks (_encode, _new_cache, _prefill_cross, _decode_step) token by token against
    the full forward, num_beams 1 and 3;
  - the Triton backend (interpreter on CPU), torch.compile(fullgraph=True).
GPU tests (marker gpu): bf16/fp16 within 3x transformers' own same-dtype error vs its fp32 output.
"""
from __future__ import annotations

import pytest
import torch
import transformers as hf

import fastlayers as fl
from fastlayers import models as flm
from fastlayers.models.bart import fp16_clamp, shift_tokens_right
from model_helpers import (assert_loss_and_grads_match, assert_rel, assert_trains_like, assert_unsupported_field_raises,
                           gpu_backend_or_skip, grads_by_checkpoint_name, perturb_)

FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4
PAD, BOS, EOS = 1, 0, 2          # transformers' BART defaults; random tokens are drawn from [3, vocab)

# Tiny configs differing in every field the architecture reads. Encoder/decoder head_dim:
# 8/6, 12/6, 4/8, 7/5 (powers of two and not); max_position_embeddings just above the tests' lengths.
CONFIGS = {
    "d24-e2x3-d3x4-gelu": dict(vocab_size=61, d_model=24, encoder_layers=2, encoder_attention_heads=3,
                               decoder_layers=3, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=29,
                               activation_function="gelu", scale_embedding=False, max_position_embeddings=16),
    "d36-e1x3-d2x6-gelu_new-scaled": dict(vocab_size=97, d_model=36, encoder_layers=1, encoder_attention_heads=3,
                                          decoder_layers=2, decoder_attention_heads=6, encoder_ffn_dim=50,
                                          decoder_ffn_dim=64, activation_function="gelu_new", scale_embedding=True,
                                          max_position_embeddings=13),
    "d16-e3x4-d1x2-relu-scaled": dict(vocab_size=31, d_model=16, encoder_layers=3, encoder_attention_heads=4,
                                      decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=20,
                                      decoder_ffn_dim=24, activation_function="relu", scale_embedding=True,
                                      max_position_embeddings=12),
    "d35-e2x5-d2x7-tanh": dict(vocab_size=64, d_model=35, encoder_layers=2, encoder_attention_heads=5,
                               decoder_layers=2, decoder_attention_heads=7, encoder_ffn_dim=33, decoder_ffn_dim=41,
                               activation_function="gelu_pytorch_tanh", scale_embedding=False,
                               max_position_embeddings=11),
}
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0)

# head -> (transformers class, fastlayers class, modes)
HEADS = {
    "base": (hf.BartModel, flm.BartModel, ("ids", "dec-mask", "shift", "embeds", "bare")),
    "lm": (hf.BartForConditionalGeneration, flm.BartForConditionalGeneration, ("ids", "dec-mask", "shift", "bare")),
    "seq-cls": (hf.BartForSequenceClassification, flm.BartForSequenceClassification, ("shift", "bare-shift")),
}


def hf_config(name: str = "d24-e2x3-d3x4-gelu", **overrides) -> hf.BartConfig:
    kw = dict(CONFIGS[name], **NO_DROPOUT)
    kw.update(overrides)
    cfg = hf.BartConfig(**kw)
    cfg._attn_implementation = "eager"     # transformers' eager path returns attentions
    return cfg


@torch.no_grad()
def _perturb(model):
    perturb_(model)
    for name, b in model.named_buffers():
        if name.endswith("final_logits_bias"):
            b.normal_()                      # non-zero, so a bias dropped or misplaced shows
    return model.eval()


def _checkpoint(tmp_path, head, config_name="d24-e2x3-d3x4-gelu", **overrides):
    hf_cls, fl_cls, _ = HEADS[head]
    cfg = hf_config(config_name, **overrides)
    ref = _perturb(hf_cls(cfg))
    d = tmp_path / f"{config_name}-{head}"
    ref.save_pretrained(d)
    return ref, fl_cls, d


def _enc_mask(B: int, L: int) -> torch.Tensor:
    """Row 0 full, 1 right-padded, 2 left-padded, 3 one token; further rows full."""
    m = torch.ones(B, L, dtype=torch.long)
    m[1, L - max(1, L // 3):] = 0
    m[2, :max(1, L // 2)] = 0
    m[3, 1:] = 0
    return m


def _dec_mask(B: int, L: int) -> torch.Tensor:
    """Another pattern than the encoder's: row 0 left-padded, 1 full, 2 right-padded, 3 one token."""
    m = torch.ones(B, L, dtype=torch.long)
    m[0, :2] = 0
    m[2, L - 2:] = 0
    m[3, 1:] = 0
    return m


def make_inputs(cfg, mode: str, B: int = 4, Ls: int = 9, Lt: int = 7) -> dict:
    """Encoder ids in [3, V), PAD at padded positions, EOS on each row's last token (classification
    pools there). mode: "ids" (+ decoder_input_ids), "dec-mask" (+ a padded decoder_attention_mask),
    "shift" (no decoder inputs: input_ids shifted right), "embeds" (inputs_embeds and
    decoder_inputs_embeds), "bare" (no attention_mask), "bare-shift" (neither)."""
    Ls, Lt = min(Ls, cfg.max_position_embeddings), min(Lt, cfg.max_position_embeddings)
    mask = _enc_mask(B, Ls)
    ids = torch.randint(3, cfg.vocab_size, (B, Ls)).masked_fill(mask == 0, PAD)
    last = (torch.arange(Ls) * mask).argmax(-1)
    ids[torch.arange(B), last] = EOS
    kw = {"input_ids": ids, "attention_mask": mask}
    if mode in ("ids", "dec-mask", "bare"):
        kw["decoder_input_ids"] = torch.randint(3, cfg.vocab_size, (B, Lt))
    if mode == "dec-mask":
        dm = _dec_mask(B, Lt)
        kw["decoder_input_ids"] = kw["decoder_input_ids"].masked_fill(dm == 0, PAD)
        kw["decoder_attention_mask"] = dm
    if mode == "embeds":
        del kw["input_ids"]
        kw["inputs_embeds"] = torch.randn(B, Ls, cfg.d_model)
        kw["decoder_inputs_embeds"] = torch.randn(B, Lt, cfg.d_model)
    if mode in ("bare", "bare-shift"):
        del kw["attention_mask"]
    return kw


def _masks(inputs: dict):
    """(encoder positions, decoder positions) to compare, (B, Ls) / (B, Lt) bool."""
    enc_ref = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"][..., 0]
    enc = inputs.get("attention_mask", torch.ones(enc_ref.shape, dtype=torch.long)).bool()
    dec_ref = inputs.get("decoder_input_ids", inputs.get("decoder_inputs_embeds", enc_ref))
    if dec_ref.dim() == 3:
        dec_ref = dec_ref[..., 0]
    dec = inputs.get("decoder_attention_mask", torch.ones(dec_ref.shape, dtype=torch.long)).bool()
    return enc, dec


def _compare(got, want, head, inputs, cfg, rtol=FWD_RTOL):
    enc, dec = _masks(inputs)
    if head == "base":
        assert_rel(got.last_hidden_state, want.last_hidden_state, rtol, "last_hidden_state", mask=dec)
    elif head == "lm":
        assert_rel(got.logits, want.logits, rtol, "logits", mask=dec)
    else:   # pooled at each row's last eos: every row compared
        assert got.logits.shape == (enc.shape[0], cfg.num_labels)
        assert_rel(got.logits, want.logits, rtol, "sequence logits")
    assert_rel(got.encoder_last_hidden_state, want.encoder_last_hidden_state, rtol, "encoder_last_hidden_state",
               mask=enc)
    for side, m, n in (("encoder", enc, cfg.encoder_layers), ("decoder", dec, cfg.decoder_layers)):
        a, b = getattr(got, f"{side}_hidden_states"), getattr(want, f"{side}_hidden_states")
        assert len(a) == len(b) == n + 1, f"{side}_hidden_states: {len(a)} tensors, transformers {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_rel(x, y, rtol, f"{side}_hidden_states[{i}]", mask=m)
    for name, m, n in (("encoder_attentions", enc, cfg.encoder_layers),
                       ("decoder_attentions", dec, cfg.decoder_layers),
                       ("cross_attentions", dec, cfg.decoder_layers)):
        a, b = getattr(got, name), getattr(want, name)
        assert len(a) == len(b) == n, name
        for i, (x, y) in enumerate(zip(a, b)):
            # (B, H, Lq, Lk) -> (B, Lq, H, Lk): non-padded queries over every key (padded and future 0)
            assert_rel(x.transpose(1, 2), y.transpose(1, 2), rtol, f"{name}[{i}]", mask=m)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_forward_matches_transformers(tmp_path, config_name, head):
    ref, fl_cls, d = _checkpoint(tmp_path, head, config_name)
    model = fl_cls.from_pretrained(d)
    assert not model.training, "from_pretrained returns the model in eval mode"
    assert model.loading_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    for mode in HEADS[head][2]:
        inputs = make_inputs(ref.config, mode)
        with torch.no_grad():
            want = ref(**inputs, output_hidden_states=True, output_attentions=True)
            got = model(**inputs, output_hidden_states=True, output_attentions=True)
        _compare(got, want, head, inputs, ref.config)
    for op in ("linear", "layer_norm", "attention"):
        assert fl.last_backend(op) == "torch", op


def test_output_access_like_transformers(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, "ids")
    labels = inputs["decoder_input_ids"]
    with torch.no_grad():
        out = model(**inputs)
        assert out.keys() == ["logits", "encoder_last_hidden_state"]
        assert out[0] is out.logits and out["encoder_last_hidden_state"] is out[1]
        assert out.decoder_hidden_states is None and out.cross_attentions is None
        with_loss = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                          return_dict=False)
        shifted = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        decoder_input_ids=shift_tokens_right(labels, PAD, ref.config.decoder_start_token_id))
    assert isinstance(with_loss, tuple) and with_loss[0].dim() == 0
    # labels alone: the decoder reads them shifted right from decoder_start_token_id
    torch.testing.assert_close(with_loss[1], shifted.logits, rtol=0, atol=0)
    assert shifted.logits[:, 0].sub(out.logits[:, 0]).abs().max() > 0


def test_sequence_classification_pools_the_last_eos(tmp_path):
    """Rows with two eos tokens pool the last one; unequal eos counts raise as in transformers."""
    ref, fl_cls, d = _checkpoint(tmp_path, "seq-cls", num_labels=4)
    model = fl_cls.from_pretrained(d)
    assert model.config.num_labels == 4
    inputs = make_inputs(ref.config, "shift")
    ids = inputs["input_ids"]
    ids[:3, 0] = EOS                          # rows 0-2: an eos at 0 as well; row 3's only token is eos
    ids[3, 0], ids[3, 2] = EOS, EOS           # row 3: two eos (the second on a padded position)
    with torch.no_grad():
        assert_rel(model(**inputs).logits, ref(**inputs).logits, FWD_RTOL, "two-eos logits")
        ids[1, 1] = EOS
        with pytest.raises(ValueError, match="same number of <eos>"):
            model(**inputs)
        with pytest.raises(ValueError, match="at least one <eos>"):
            model(input_ids=torch.full((2, 4), 5), attention_mask=torch.ones(2, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=torch.randn(2, 4, ref.config.d_model))


def test_default_config_is_transformers(tmp_path):
    ours, theirs = flm.BartConfig(), hf.BartConfig()
    for f in ("vocab_size", "max_position_embeddings", "encoder_layers", "encoder_ffn_dim", "encoder_attention_heads",
              "decoder_layers", "decoder_ffn_dim", "decoder_attention_heads", "encoder_layerdrop", "decoder_layerdrop",
              "activation_function", "d_model", "dropout", "attention_dropout", "activation_dropout", "init_std",
              "classifier_dropout", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id",
              "decoder_start_token_id", "forced_eos_token_id", "is_encoder_decoder", "tie_word_embeddings",
              "num_labels", "hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert getattr(ours, f) == getattr(theirs, f), f
    # a config saved by transformers reads back field by field, labels included
    ref, _, d = _checkpoint(tmp_path, "seq-cls", num_labels=5)
    cfg = flm.AutoConfig.from_pretrained(d)
    assert type(cfg) is flm.BartConfig and cfg.num_labels == 5 and cfg.id2label[4] == "LABEL_4"
    assert cfg.encoder_ffn_dim == 37 and cfg.decoder_attention_heads == 4 and cfg.forced_eos_token_id == EOS


@pytest.mark.parametrize("field,value", [("activation_function", "swish"), ("is_decoder", True),
                                         ("is_encoder_decoder", False), ("d_model", 25),
                                         ("decoder_attention_heads", 5), ("dropout", 1.5),
                                         ("encoder_layerdrop", -0.1)])
def test_unsupported_config_fields_raise_naming_the_field(tmp_path, field, value):
    _, fl_cls, d = _checkpoint(tmp_path, "lm")
    assert_unsupported_field_raises(d, fl_cls, flm.BartConfig, field, value)


def test_bad_inputs_raise_naming_the_argument(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, "ids")
    ids, mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
    with torch.no_grad():
        with pytest.raises(ValueError, match="input_ids / inputs_embeds"):
            model(decoder_input_ids=dec)
        with pytest.raises(ValueError, match="decoder_input_ids"):
            model(inputs_embeds=torch.randn(4, 5, ref.config.d_model))        # nothing to shift
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids=ids, attention_mask=mask[:, :-1], decoder_input_ids=dec)
        with pytest.raises(ValueError, match="decoder_attention_mask"):
            model(input_ids=ids, decoder_input_ids=dec, decoder_attention_mask=mask)
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model(input_ids=torch.full((1, ref.config.max_position_embeddings + 1), 5))
        with pytest.raises(ValueError, match="decoder_input_ids"):
            model(input_ids=ids, decoder_input_ids=dec.float())
    with pytest.raises(ValueError, match="pad_token_id"):
        shift_tokens_right(ids, None, 2)


# ------------------------------------------------------------------------------------ details
@torch.no_grad()
def test_positions_read_rows_offset_by_two(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "base")
    model = fl_cls.from_pretrained(d)
    P = ref.config.max_position_embeddings
    for side in (model.encoder, model.decoder):
        assert side.embed_positions.weight.shape == (P + 2, ref.config.d_model)
    inputs = make_inputs(ref.config, "ids")
    base = model(**inputs).last_hidden_state
    for side in ("encoder", "decoder"):
        w = getattr(model, side).embed_positions.weight
        w[:2].normal_()                                     # rows 0 and 1: never read
        assert torch.equal(model(**inputs).last_hidden_state, base), f"{side}: rows 0-1 of embed_positions were read"
        saved = w[2].clone()
        w[2].add_(1.0)                                      # row 2: position 0
        assert not torch.equal(model(**inputs).last_hidden_state, base), f"{side}: position 0 is not row 2"
        w[2].copy_(saved)


@torch.no_grad()
@pytest.mark.parametrize("scale", [False, True])
def test_embeddings_scaled_then_layernorm_embedding(tmp_path, scale):
    """encoder_hidden_states[0] = layernorm_embedding(embed_tokens(ids) * (sqrt(d) or 1) + positions[2:]),
    written out by hand; inputs_embeds are taken unscaled (as transformers)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "base", scale_embedding=scale)
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, "ids")
    ids = inputs["input_ids"]
    enc = model.encoder
    s = ref.config.d_model ** 0.5 if scale else 1.0
    want = torch.nn.functional.layer_norm(enc.embed_tokens(ids) * s + enc.embed_positions.weight[2:ids.shape[1] + 2],
                                          (ref.config.d_model,), enc.layernorm_embedding.weight,
                                          enc.layernorm_embedding.bias, 1e-5)
    got = model(**inputs, output_hidden_states=True).encoder_hidden_states[0]
    assert_rel(got, want, 1e-6, "embedding output")
    embeds = enc.embed_tokens(ids)
    from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                        decoder_input_ids=inputs["decoder_input_ids"], output_hidden_states=True)
    theirs = ref(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                 decoder_input_ids=inputs["decoder_input_ids"], output_hidden_states=True)
    assert_rel(from_embeds.encoder_hidden_states[0], theirs.encoder_hidden_states[0], 1e-6, "inputs_embeds output")
    assert torch.equal(from_embeds.encoder_hidden_states[0], got) == (not scale)


def test_fp16_clamp_formula():
    """fp16_clamp against transformers' lines: clamp the whole tensor when any value is inf/NaN."""
    def theirs(h):
        if h.dtype == torch.float16 and not torch.isfinite(h).all():
            c = torch.finfo(h.dtype).max - 1000
            h = torch.clamp(h, min=-c, max=c)
        return h
    big = 65000.0                                               # finite, above the clamp value 64504
    cases = [torch.tensor([1.0, -big, big, 3.0], dtype=torch.float16),                 # finite: untouched
             torch.tensor([1.0, -big, float("inf"), 3.0], dtype=torch.float16),        # inf: all clamped
             torch.tensor([[float("-inf"), big], [0.5, float("nan")]], dtype=torch.float16),
             torch.tensor([float("inf"), big], dtype=torch.bfloat16),                  # other dtypes pass
             torch.tensor([float("inf"), 1e30], dtype=torch.float32)]
    for h in cases:
        torch.testing.assert_close(fp16_clamp(h), theirs(h.clone()), rtol=0, atol=0, equal_nan=True)
    assert fp16_clamp(cases[1])[1] == -64504.0 and fp16_clamp(cases[0])[2] == big


@torch.no_grad()
def test_fp16_encoder_clamp_matches_transformers(tmp_path):
    """A final_layer_norm scaled past fp16's range makes the first encoder layer's output overflow on
    some positions: transformers (fp16 on CPU) clamps them to +-64504, and so must we."""
    ref, fl_cls, d = _checkpoint(tmp_path, "base", encoder_layers=1)
    ln = ref.encoder.layers[0].final_layer_norm
    ln.weight[:4] = 5e4
    ln.bias[:4] = 3e4
    ref.save_pretrained(d)
    ref16 = hf.BartModel.from_pretrained(d, dtype=torch.float16, attn_implementation="eager").eval()
    model = fl_cls.from_pretrained(d, dtype=torch.float16)
    inputs = make_inputs(ref.config, "ids")
    enc = inputs["attention_mask"].bool()
    want = ref16(**inputs).encoder_last_hidden_state
    got = model(**inputs).encoder_last_hidden_state
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    clamped = want.abs() == 64504.0
    assert clamped.any() and torch.isfinite(want).all(), "the case did not overflow: it tests nothing"
    assert torch.equal(got.abs() == 64504.0, clamped), "clamped positions differ from transformers'"
    # channels 4+: ordinary values; channels 0-3 are 5e4 * xhat + 3e4, so fp16 rounding of the norm's
    # input shows up 5e4-fold there: compared relative to their range
    torch.testing.assert_close(got[enc][:, 4:], want[enc][:, 4:], rtol=1e-2, atol=1e-2)
    assert_rel(got[enc][:, :4].float(), want[enc][:, :4].float(), 3e-3, "overflowing channels")
    # without the clamp the same layer overflows: the test would catch its absence
    h = model.encoder._embed(inputs["input_ids"], None, torch.arange(inputs["input_ids"].shape[1])[None])
    layer = model.encoder.layers[0]
    a, _ = layer.self_attn(h, enc, False, False)
    raw = layer._ffn(layer._add_norm(layer.self_attn.out_proj, layer.self_attn_layer_norm, a, h))
    assert not torch.isfinite(raw).all()


@torch.no_grad()
def test_final_logits_bias_absent_from_checkpoint_loads_as_zeros(tmp_path):
    from safetensors.torch import load_file, save_file
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    sd = load_file(str(d / "model.safetensors"))
    del sd["final_logits_bias"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = fl_cls.from_pretrained(d)
    assert model.loading_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert torch.equal(model.final_logits_bias, torch.zeros(1, ref.config.vocab_size))
    theirs = hf.BartForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    assert torch.equal(theirs.final_logits_bias, model.final_logits_bias)
    inputs = make_inputs(ref.config, "ids")
    assert_rel(model(**inputs).logits, theirs(**inputs).logits, FWD_RTOL, "logits without final_logits_bias",
               mask=_masks(inputs)[1])
    # and in bf16 (the buffer follows the model's dtype)
    assert fl_cls.from_pretrained(d, dtype=torch.bfloat16).final_logits_bias.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ training
def _labels(cfg, head, inputs):
    enc, dec = _masks(inputs)
    if head == "lm":
        B, L = dec.shape
        y = torch.randint(3, cfg.vocab_size, (B, L))
        return {"labels": y.masked_fill(~dec | (torch.rand(B, L) < 0.2), -100)}
    if head == "seq-cls":
        return {"labels": torch.randint(0, cfg.num_labels, (enc.shape[0],))}
    return {}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_loss_and_gradients_match_transformers(tmp_path, config_name, head):
    ref, fl_cls, d = _checkpoint(tmp_path, head, config_name, dropout=0.1, attention_dropout=0.1,
                                 activation_dropout=0.1, classifier_dropout=0.1)
    # dropout off through config overrides on both sides: train() must then be deterministic
    ref = type(ref).from_pretrained(d, attn_implementation="eager", **NO_DROPOUT).train()
    model = fl_cls.from_pretrained(d, **NO_DROPOUT).train()
    assert model.training and all(getattr(model.config, k) == 0.0 for k in NO_DROPOUT)
    inputs = make_inputs(ref.config, {"base": "dec-mask", "lm": "dec-mask", "seq-cls": "shift"}[head])
    if head == "lm":          # decoder inputs: the labels shifted right (-100 -> pad)
        inputs.pop("decoder_input_ids")
    labels = _labels(ref.config, head, inputs)
    want = ref(**inputs, **labels)
    got = model(**inputs, **labels)
    if head == "base":   # no loss: a fixed random projection of the non-padded outputs, both stacks
        enc, dec = _masks(inputs)
        w = torch.randn_like(want.last_hidden_state) * dec[..., None]
        we = torch.randn_like(want.encoder_last_hidden_state) * enc[..., None]
        loss_ref = (want.last_hidden_state * w).sum() + (want.encoder_last_hidden_state * we).sum()
        loss = (got.last_hidden_state * w).sum() + (got.encoder_last_hidden_state * we).sum()
    else:
        loss_ref, loss = want.loss, got.loss
        assert loss is not None and loss.dim() == 0 and loss.dtype == torch.float32
    assert_loss_and_grads_match(ref, model, loss_ref, loss, GRAD_RTOL)


def test_training_steps_match_transformers(tmp_path):
    """Five SGD steps of seq2seq training: the same losses (llm.c's test_gpt2 in small)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    model = fl_cls.from_pretrained(d).train()
    ref.train()
    inputs = make_inputs(ref.config, "shift")
    y = torch.randint(3, ref.config.vocab_size, (4, 7))
    labels = {"labels": y.masked_fill(torch.rand(4, 7) < 0.2, -100)}       # decoder inputs: labels shifted
    assert_trains_like(ref, model, inputs, labels, GRAD_RTOL, lr=0.3)
    # the ties survived training: one tensor for shared, both embed_tokens and lm_head
    w = model.model.shared.weight
    assert model.lm_head.weight is w and model.model.encoder.embed_tokens.weight is w
    assert model.model.decoder.embed_tokens.weight is w


def test_layerdrop_draws_as_transformers(tmp_path):
    """train() with LayerDrop: one torch.rand([]) per layer, as transformers, so equal seeds skip
    the same layers (dropout itself off)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "lm", encoder_layerdrop=0.5, decoder_layerdrop=0.5)
    ref = type(ref).from_pretrained(d, attn_implementation="eager").train()
    model = fl_cls.from_pretrained(d).train()
    inputs = make_inputs(ref.config, "ids")
    seen = set()
    with torch.no_grad():
        for seed in range(6):
            torch.manual_seed(seed)
            want = ref(**inputs).logits
            torch.manual_seed(seed)
            got = model(**inputs).logits
            assert_rel(got, want, FWD_RTOL, f"layerdrop logits, seed {seed}")
            seen.add(round(want.abs().sum().item(), 3))
        assert len(seen) > 1, "LayerDrop never changed the output"
        model.eval()
        assert_rel(model(**inputs).logits, ref.eval()(**inputs).logits, FWD_RTOL, "eval: no LayerDrop",
                   mask=_masks(inputs)[1])


def test_dropout_follows_train_and_eval(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm", dropout=0.3, attention_dropout=0.3, activation_dropout=0.3)
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, "ids")
    with torch.no_grad():
        e1 = model(**inputs).logits
        assert torch.equal(e1, model(**inputs).logits), "eval() must be deterministic"
        assert_rel(e1, ref(**inputs).logits, FWD_RTOL, "eval logits with dropout configured")
        model.train()
        t1, t2 = model(**inputs).logits, model(**inputs).logits
        assert (t1 - e1).abs().max() > 1e-2, "train() with dropout 0.3 gave the eval output"
        assert (t1 - t2).abs().max() > 1e-2, "two train() forwards drew the same dropout"
        for only in ("dropout", "attention_dropout", "activation_dropout"):     # each rate acts on its own
            kw = {k: (0.3 if k == only else 0.0) for k in NO_DROPOUT}
            one = fl_cls.from_pretrained(d, **kw).train()
            assert (one(**inputs).logits - e1).abs().max() > 1e-3, f"{only}=0.3 had no effect in train()"
        with pytest.raises(ValueError, match="output_attentions"):
            model(**inputs, output_attentions=True)
        model.eval()
        assert torch.equal(model(**inputs).logits, e1), "eval() after train() differs"


def test_gradient_checkpointing_same_gradients(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    inputs = make_inputs(ref.config, "dec-mask")
    labels = _labels(ref.config, "lm", inputs)
    grads = []
    for ckpt in (False, True):
        model = fl_cls.from_pretrained(d).train()
        if ckpt:
            model.gradient_checkpointing_enable()
            assert model.model.encoder.gradient_checkpointing and model.model.decoder.gradient_checkpointing
        model(**inputs, **labels).loss.backward()
        grads.append(grads_by_checkpoint_name(model))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("head", list(HEADS))
def test_state_dict_keys_and_shapes_are_the_checkpoints(tmp_path, head):
    ref, fl_cls, d = _checkpoint(tmp_path, head)
    model = fl_cls.from_pretrained(d)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    fresh = fl_cls(model.config)
    fresh.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@torch.no_grad()
@pytest.mark.parametrize("head", list(HEADS))
def test_transformers_loads_what_we_save(tmp_path, head):
    ref, fl_cls, d = _checkpoint(tmp_path, head, "d36-e1x3-d2x6-gelu_new-scaled")
    model = fl_cls.from_pretrained(d)
    body = model if head == "base" else model.model
    body.decoder.layers[1].self_attn.qkv.weight.mul_(1.5)      # a stale file would be caught
    body.decoder.layers[0].encoder_attn.kv.bias.add_(0.3)
    body.encoder.layers[0].self_attn.qkv.bias.add_(0.3)
    out = tmp_path / "ours"
    model.save_pretrained(out)
    back, info = HEADS[head][0].from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.scale_embedding is True and back.config.decoder_attention_heads == 6
    assert back.config.activation_function == "gelu_new" and back.config.encoder_ffn_dim == 50
    inputs = make_inputs(ref.config, "shift")
    want = back.eval()(**inputs)
    got = model(**inputs)
    name = "last_hidden_state" if head == "base" else "logits"
    assert_rel(getattr(got, name), getattr(want, name), FWD_RTOL, f"{name} of transformers on our checkpoint")
    assert (getattr(want, name) - getattr(ref(**inputs), name)).abs().max() > 1e-3, "our edits were not saved"
    again = fl_cls.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    from safetensors.torch import load_file
    saved = load_file(str(out / "model.safetensors"))
    assert "model.shared.weight" in saved or "shared.weight" in saved
    assert not any("embed_tokens" in k or k == "lm_head.weight" for k in saved), "tied copies were saved"


@torch.no_grad()
def test_heads_and_body_load_each_others_checkpoints(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    inputs = make_inputs(ref.config, "ids")
    dec = _masks(inputs)[1]
    base = flm.BartModel.from_pretrained(d)
    assert base.loading_info["unexpected_keys"] == ["final_logits_bias"], base.loading_info
    assert_rel(base(**inputs).last_hidden_state, ref.model(**inputs).last_hidden_state, FWD_RTOL,
               "body from the LM checkpoint", mask=dec)
    body = tmp_path / "body"
    ref.model.save_pretrained(body)
    lm = flm.BartForConditionalGeneration.from_pretrained(body)
    assert lm.loading_info["missing_keys"] == []          # lm_head tied, final_logits_bias zeros
    want = torch.nn.functional.linear(ref.model(**inputs).last_hidden_state, ref.model.shared.weight)
    assert_rel(lm(**inputs).logits, want, FWD_RTOL, "LM head from a body checkpoint", mask=dec)
    cls = flm.AutoModelForSequenceClassification.from_pretrained(d)
    assert type(cls) is flm.BartForSequenceClassification
    assert sorted(cls.loading_info["missing_keys"]) == sorted(
        f"classification_head.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias"))


def test_we_load_sharded_and_bin_checkpoints(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    inputs = make_inputs(ref.config, "ids")
    dec = _masks(inputs)[1]
    with torch.no_grad():
        want = ref(**inputs).logits
        ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
        got = fl_cls.from_pretrained(tmp_path / "sharded")(**inputs).logits
        assert_rel(got, want, FWD_RTOL, "sharded checkpoint logits", mask=dec)
        # pytorch_model.bin as fairseq-era files hold it: every tied copy, plus encoder/decoder.version
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "config.json").write_text((d / "config.json").read_text())
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        sd["model.encoder.version"] = sd["model.decoder.version"] = torch.tensor([2.0])
        torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
        model = fl_cls.from_pretrained(tmp_path / "bin")
        assert model.loading_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
        assert_rel(model(**inputs).logits, want, FWD_RTOL, "pytorch_model.bin logits", mask=dec)


@torch.no_grad()
def test_untied_word_embeddings(tmp_path):
    """tie_word_embeddings=False: shared, both embed_tokens and lm_head are four tensors (transformers 5)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "lm", tie_word_embeddings=False)
    model = fl_cls.from_pretrained(d)
    ws = [model.model.shared.weight, model.model.encoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight,
          model.lm_head.weight]
    assert len({id(w) for w in ws}) == 4
    for k in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[k], ref.state_dict()[k]), k
    inputs = make_inputs(ref.config, "ids")
    assert_rel(model(**inputs).logits, ref(**inputs).logits, FWD_RTOL, "untied logits", mask=_masks(inputs)[1])
    out = tmp_path / "ours"
    model.save_pretrained(out)
    back = hf.BartForConditionalGeneration.from_pretrained(out)
    assert back.config.tie_word_embeddings is False
    assert torch.equal(back.lm_head.weight, ref.lm_head.weight)
    assert torch.equal(back.model.encoder.embed_tokens.weight, ref.model.encoder.embed_tokens.weight)


def test_generation_config_is_read_and_written(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    model = fl_cls.from_pretrained(d)
    gc = model.generation_config
    assert gc is not None and gc.decoder_start_token_id == EOS and gc.eos_token_id == EOS
    out = tmp_path / "ours"
    model.save_pretrained(out)
    theirs = hf.GenerationConfig.from_pretrained(out)
    assert theirs.decoder_start_token_id == EOS and theirs.forced_eos_token_id == EOS


def test_auto_classes_pick_bart(tmp_path):
    ref, _, d = _checkpoint(tmp_path, "lm")
    assert type(flm.AutoModelForSeq2SeqLM.from_pretrained(d)) is flm.BartForConditionalGeneration
    assert type(flm.AutoModel.from_pretrained(d)) is flm.BartModel
    assert type(flm.AutoConfig.from_pretrained(d)) is flm.BartConfig
    assert flm.model_for_architecture(d) is flm.BartForConditionalGeneration
    assert "bart" in flm.supported_model_types()


# ------------------------------------------------------------------------------------ generation hooks
@torch.no_grad()
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("config_name", ["d24-e2x3-d3x4-gelu", "d36-e1x3-d2x6-gelu_new-scaled"])
def test_decode_steps_equal_the_full_forward(tmp_path, config_name, num_beams):
    """_prefill_cross + _decode_step token by token == the full forward's logits, every decoder
    position, for num_beams rows per encoder row (each beam its own decoder sequence), encoder rows
    padded differently; the cross K/V are held once per encoder row."""
    ref, fl_cls, d = _checkpoint(tmp_path, "lm", config_name)
    model = fl_cls.from_pretrained(d)
    cfg = ref.config
    B, Ls, T = 4, 9, 6
    inputs = make_inputs(cfg, "ids", B=B, Ls=Ls)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    N = B * num_beams
    dec = torch.randint(3, cfg.vocab_size, (N, T))
    dec[:, 0] = cfg.decoder_start_token_id
    full = model(input_ids=ids.repeat_interleave(num_beams, 0), attention_mask=mask.repeat_interleave(num_beams, 0),
                 decoder_input_ids=dec).logits                                           # (N, T, V)
    assert_rel(full, ref(input_ids=ids.repeat_interleave(num_beams, 0),
                         attention_mask=mask.repeat_interleave(num_beams, 0), decoder_input_ids=dec).logits,
               FWD_RTOL, "full forward")
    cache = model._new_cache(N, T + 2, encoder_len=Ls, num_beams=num_beams)
    assert len(cache.k) == len(cache.cross_k) == cfg.decoder_layers and cache.num_beams == num_beams
    H, D = cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads
    assert cache.k[0].shape == (N, T + 2, H, D) and cache.cross_k[0].shape == (B, Ls, H, D)
    assert cache.cross_mask.shape == (B, Ls) and cache.cross_mask.dtype == torch.bool
    addresses = [t.data_ptr() for t in cache.cross_k + cache.cross_v + [cache.cross_mask]]
    for attempt in range(2):             # the second run reuses the cache in place (a captured graph's buffers)
        if attempt:
            ids = torch.randint(3, cfg.vocab_size, (B, Ls)).masked_fill(mask == 0, PAD)
            mask = mask.flip(0)
            ids = ids.flip(0)
            full = model(input_ids=ids.repeat_interleave(num_beams, 0),
                         attention_mask=mask.repeat_interleave(num_beams, 0), decoder_input_ids=dec).logits
            cache.seqlens.zero_()
        enc = model._encode(ids, mask)
        assert enc.shape == (B, Ls, cfg.d_model)
        model._prefill_cross(enc, mask.bool(), cache)
        assert [t.data_ptr() for t in cache.cross_k + cache.cross_v + [cache.cross_mask]] == addresses
        assert torch.equal(cache.cross_mask, mask.bool())
        for t in range(T):
            logits = model._decode_step(dec[:, t:t + 1], torch.full((N, 1), t), cache)
            assert logits.shape == (N, cfg.vocab_size) and logits.dtype == torch.float32
            assert int(cache.seqlens.max()) == t, "_decode_step must not advance seqlens"
            cache.seqlens += 1
            assert_rel(logits, full[:, t], FWD_RTOL, f"step {t} (run {attempt})")
    assert model.max_positions == cfg.max_position_embeddings and model._vocab_size() == cfg.vocab_size
    assert model.is_encoder_decoder is True


@torch.no_grad()
def test_cache_hooks_check_their_shapes(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm")
    model = fl_cls.from_pretrained(d)
    with pytest.raises(ValueError, match="num_beams"):
        model._new_cache(6, 8, num_beams=4)
    cache = model._new_cache(6, 8, encoder_len=5, num_beams=2)
    enc = torch.randn(3, 7, ref.config.d_model)
    with pytest.raises(ValueError, match="encoder_hidden"):
        model._prefill_cross(enc, None, cache)
    with pytest.raises(ValueError, match="encoder_hidden"):
        model._prefill_cross(torch.randn(2, 5, ref.config.d_model), None, cache)
    lazy = model._new_cache(6, 8, num_beams=2)                     # cross buffers at the first prefill
    assert lazy.cross_k is None
    model._prefill_cross(enc, None, lazy)
    assert lazy.cross_k[0].shape[:2] == (3, 7) and bool(lazy.cross_mask.all())
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model._prefill_cross(enc, torch.ones(3, 6, dtype=torch.bool), lazy)


# ------------------------------------------------------------------------------------ backends
def test_triton_backend_runs_the_whole_model(tmp_path):
    """One tiny config through the Triton kernels (the interpreter on CPU: slow, so tiny), the
    forward and one decode step (head_dim 8: the Triton attention takes multiples of 8)."""
    info = fl.available_backends()["triton"]
    if not info["available"]:
        pytest.skip(f"triton backend not available here: {info['reason']}")
    ref, fl_cls, d = _checkpoint(tmp_path, "lm", encoder_layers=1, decoder_layers=1, d_model=16,
                                 encoder_attention_heads=2, decoder_attention_heads=2)
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, "ids", Ls=5, Lt=4)
    ids, mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
    dec_mask = _masks(inputs)[1]
    with torch.no_grad():
        want = ref(**inputs).logits
        got_torch = model(**inputs).logits
        with fl.use_backend("triton"):
            got = model(**inputs).logits
            for op in ("linear", "layer_norm", "attention"):
                assert fl.last_backend(op) == "triton", f"{op} ran on {fl.last_backend(op)!r}"
            cache = model._new_cache(4, 4, encoder_len=5)
            model._prefill_cross(model._encode(ids, mask), mask.bool(), cache)
            step = model._decode_step(dec[:, :1], torch.zeros(4, 1, dtype=torch.long), cache)
            assert fl.last_backend("attention_with_kvcache") == "triton"
    assert not torch.equal(got, got_torch), "triton gave bit-identical logits: did it run?"
    assert_rel(got, want, 1e-5, "triton logits", mask=dec_mask, atol=1e-5)
    assert_rel(step, want[:, 0], 1e-5, "triton decode step", atol=1e-5)


def test_torch_compile_fullgraph_matches_eager(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "lm", "d16-e3x4-d1x2-relu-scaled", encoder_layers=1)
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, "dec-mask", B=4, Ls=7, Lt=5)
    labels = {"labels": inputs["decoder_input_ids"].masked_fill(inputs["decoder_attention_mask"] == 0, -100)}
    # aot_eager: traces the whole model through the ops' fake implementations (fullgraph: no graph break)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(**inputs, **labels)
        got = compiled(**inputs, **labels)
    assert_rel(got.logits, eager.logits, 1e-5, "compiled logits", mask=_masks(inputs)[1])
    assert_rel(got.loss, eager.loss, 1e-5, "compiled loss")


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_half_precision_within_3x_transformers_error(tmp_path, backend, dtype):
    """Our bf16/fp16 logits (full forward, and decode steps) vs transformers' fp32 within 3x
    transformers' own error at the same dtype, on the non-padded positions of a padded batch, every
    op on the requested backend."""
    gpu_backend_or_skip(backend)
    cfg = hf_config("d24-e2x3-d3x4-gelu", d_model=256, encoder_attention_heads=4, decoder_attention_heads=8,
                    encoder_layers=3, decoder_layers=3, encoder_ffn_dim=1024, decoder_ffn_dim=768, vocab_size=1000,
                    max_position_embeddings=160, scale_embedding=True)
    cfg._attn_implementation = "sdpa"
    ref32 = hf.BartForConditionalGeneration(cfg)
    with torch.no_grad():   # mild perturbation: biases and LayerNorm off their init, values stay O(1)
        for p in ref32.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        ref32.final_logits_bias.normal_()
    d = tmp_path / "ckpt"
    ref32.save_pretrained(d)
    ref32 = ref32.cuda().eval()
    ref_half = hf.BartForConditionalGeneration.from_pretrained(d, dtype=dtype).cuda().eval()
    model = flm.BartForConditionalGeneration.from_pretrained(d, dtype=dtype, device="cuda")
    assert model.dtype == dtype and model.device.type == "cuda"
    inputs = {k: v.cuda() for k, v in make_inputs(cfg, "dec-mask", B=6, Ls=150, Lt=40).items()}
    dec = _masks(inputs)[1]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = ref32(**inputs).logits
            theirs = ref_half(**inputs).logits
            with fl.use_backend(backend):
                got = model(**inputs).logits
                for op in ("linear", "layer_norm", "attention"):
                    assert fl.last_backend(op) == backend, f"{op} ran on {fl.last_backend(op)!r}"
                # decode steps of full rows (row 1's decoder is unpadded), 2 beams per encoder row
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                nb, T = 2, 8
                dids = inputs["decoder_input_ids"][1:2, :T].expand(ids.shape[0] * nb, T)
                cache = model._new_cache(ids.shape[0] * nb, T, encoder_len=ids.shape[1], num_beams=nb)
                model._prefill_cross(model._encode(ids, mask), mask.bool(), cache)
                steps = []
                for t in range(T):
                    steps.append(model._decode_step(dids[:, t:t + 1], torch.full_like(dids[:, :1], t), cache))
                    cache.seqlens += 1
                steps = torch.stack(steps, 1)                                             # (N, T, V)
            step_want = ref32(input_ids=ids.repeat_interleave(nb, 0), attention_mask=mask.repeat_interleave(nb, 0),
                              decoder_input_ids=dids).logits
            step_theirs = ref_half(input_ids=ids.repeat_interleave(nb, 0),
                                   attention_mask=mask.repeat_interleave(nb, 0), decoder_input_ids=dids).logits
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert got.dtype == dtype
    for what, ours, half, ref in (("forward", got[dec], theirs[dec], want[dec]),
                                  ("decode steps", steps, step_theirs, step_want)):
        ours, half, ref = ours.double(), half.double(), ref.double()
        assert torch.isfinite(ours).all(), what
        err, base = (ours - ref).abs().max().item(), (half - ref).abs().max().item()
        assert base > 0, f"{what}: transformers' half-precision run equals its fp32 run: the check proves nothing"
        assert err <= 3 * base, f"{backend} {dtype} {what}: max error {err:.3e} > 3x transformers' own {base:.3e}"
