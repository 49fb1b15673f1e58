"""fl.patch / fl.unpatch on transformers' own BERT, RoBERTa, GPT-2 and BART models (tiny random
configs, perturbed weights, CPU).

The reference is the same model unpatched, on transformers' eager attention (an explicit additive
mask: an independent computation of the padding semantics). Outputs are compared on non-padded
positions (a padded query row is 0 in fl.attention and a uniform average in eager), gradients of a
loss on those positions for every parameter. Each parity test also proves that fl.attention ran
(attention_stats) and that nothing fell back to transformers' sdpa.
"""
from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch
import transformers as hf
from transformers.masking_utils import AttentionMaskInterface

import fastlayers as fl
from fastlayers.patch import ATTN_NAMES, attention_stats, reset_attention_stats
from gpt2_helpers import hf_generate, left_padded
from model_helpers import assert_rel, perturb_

torch.set_num_threads(1)

RTOL = 1e-5        # outputs, relative to max |ref| (the bar)
GRAD_RTOL = 1e-5   # gradients, per parameter, relative to max |ref grad|
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert_cfg(**kw):
    return hf.BertConfig(**{**dict(vocab_size=50, hidden_size=24, num_attention_heads=3, num_hidden_layers=2,
                                   intermediate_size=37, max_position_embeddings=20, layer_norm_eps=1e-3,
                                   hidden_act="gelu", **NO_DROP), **kw})


def roberta_cfg(**kw):
    return hf.RobertaConfig(**{**dict(vocab_size=50, hidden_size=20, num_attention_heads=4, num_hidden_layers=2,
                                      intermediate_size=29, max_position_embeddings=24, pad_token_id=1,
                                      hidden_act="gelu_new", **NO_DROP), **kw})


def gpt2_cfg(**kw):
    return hf.GPT2Config(**{**dict(vocab_size=61, n_embd=24, n_head=3, n_layer=2, n_positions=32, n_inner=None,
                                   activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0), **kw})


def bart_cfg(**kw):
    return hf.BartConfig(**{**dict(vocab_size=50, d_model=24, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=30,
                                   decoder_ffn_dim=31, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                   activation_dropout=0.0, activation_function="gelu", pad_token_id=1, bos_token_id=0,
                                   eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None), **kw})


# name -> (class, config factory, family, attention calls per forward)
MODELS = {
    "bert-base": (hf.BertModel, bert_cfg, "bert", 2),
    "bert-mlm": (hf.BertForMaskedLM, bert_cfg, "bert", 2),
    "bert-token": (hf.BertForTokenClassification, bert_cfg, "bert", 2),
    "bert-seqcls": (hf.BertForSequenceClassification, bert_cfg, "bert", 2),
    "bert-causal-lm": (hf.BertLMHeadModel, lambda **kw: bert_cfg(is_decoder=True, **kw), "bert", 2),
    "roberta-mlm": (hf.RobertaForMaskedLM, roberta_cfg, "roberta", 2),
    "gpt2-lm": (hf.GPT2LMHeadModel, gpt2_cfg, "gpt2", 2),
    "gpt2-seqcls": (hf.GPT2ForSequenceClassification, gpt2_cfg, "gpt2", 2),
    "bart-cg": (hf.BartForConditionalGeneration, bart_cfg, "bart", 6),
    "bart-seqcls": (hf.BartForSequenceClassification, bart_cfg, "bart", 6),
}
PAD = {"bert": 0, "roberta": 1, "gpt2": 0, "bart": 1}


def make_ref(name, **cfg_kw):
    cls, cfg_fn, _, _ = MODELS[name]
    m = cls(cfg_fn(**cfg_kw))
    perturb_(m)  # LayerNorm weights off 1, biases off 0: a parameter in the wrong place shows
    m.set_attn_implementation("eager")
    return m.eval()


def pair(name, **cfg_kw):
    ref = make_ref(name, **cfg_kw)
    return ref, fl.patch(copy.deepcopy(ref))


def mask_rows(B, L, *, left=True):
    """(B, L) int64, 1 = token: row 0 full, row 1 right-padded, row 2 left-padded (else right), row 3 one token."""
    m = torch.ones(B, L, dtype=torch.long)
    m[1, L - L // 3:] = 0
    if left:
        m[2, :L // 2] = 0
    else:
        m[2, L - L // 2:] = 0
    m[3, 1:] = 0
    return m


def make_inputs(name, padded, B=4, L=9):
    """(model kwargs, [(output field, (B, L) bool of the positions compared)])."""
    family = MODELS[name][2]
    seqcls = name.endswith("seqcls")
    lo = 3  # token ids never equal to a pad / special id
    V = 50 if family != "gpt2" else 61
    ids = torch.randint(lo, V, (B, L))
    m = mask_rows(B, L, left=not seqcls and family != "roberta") if padded else None
    if m is not None:
        ids = ids.masked_fill(m == 0, PAD[family])
    kw = {"input_ids": ids, "attention_mask": m}
    if family == "bart":
        if seqcls:  # the head reads the decoder state at the eos: one eos (2) per row, at its last token
            last = (m.sum(1) - 1) if m is not None else torch.full((B,), L - 1)
            ids[torch.arange(B), last] = 2
            return kw, [("logits", None)]
        Ld = 6
        dec = torch.randint(lo, V, (B, Ld))
        dm = mask_rows(B, Ld, left=False) if padded else None
        if dm is not None:
            dec = dec.masked_fill(dm == 0, PAD[family])
        kw.update(decoder_input_ids=dec, decoder_attention_mask=dm)
        tok = dm.bool() if dm is not None else torch.ones(B, Ld, dtype=torch.bool)
        enc = m.bool() if m is not None else torch.ones(B, L, dtype=torch.bool)
        return kw, [("logits", tok), ("encoder_last_hidden_state", enc)]
    if seqcls:
        return kw, [("logits", None)]
    tok = m.bool() if m is not None else torch.ones(B, L, dtype=torch.bool)
    return kw, [("last_hidden_state" if name == "bert-base" else "logits", tok)]


def outputs(model, kw, fields):
    out = model(**kw)
    return [(f, out[f], pos) for f, pos in fields]


def fl_calls() -> int:
    s = attention_stats()
    assert not [k for k in s if k != "fastlayers"], f"fallbacks where none was expected: {s}"
    return s.get("fastlayers", 0)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_gradients_and_names_match_unpatched(name, padded):
    ref, pat = pair(name)
    assert pat.config._attn_implementation == "fastlayers"
    assert [n for n, _ in pat.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(pat.state_dict()) == list(ref.state_dict())
    kw, fields = make_inputs(name, padded)
    reset_attention_stats()
    got, want = outputs(pat, kw, fields), outputs(ref, kw, fields)
    assert fl_calls() == MODELS[name][3], "fl.attention did not run once per attention layer"
    loss_p = loss_r = 0.0
    for (f, g, pos), (_, w, _) in zip(got, want):
        assert_rel(g, w, RTOL, f"{name} {f}", mask=pos)
        weights = torch.randn_like(w)
        keep = pos[..., None] if (pos is not None and w.dim() > pos.dim()) else pos
        keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.expand_as(w)
        loss_p = loss_p + (g * weights * keep).sum()
        loss_r = loss_r + (w * weights * keep).sum()
    loss_p.backward()
    loss_r.backward()
    gref = dict(ref.named_parameters())
    # floor: rounding noise on gradients that are 0 in exact math (the key bias: softmax ignores it)
    floor = GRAD_RTOL * max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for n, p in pat.named_parameters():
        r = gref[n].grad
        if r is None or r.abs().max() == 0:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name}: gradient of {n} should be 0"
            continue
        assert_rel(p.grad, r, GRAD_RTOL, f"{name} grad {n}", atol=floor)


def test_patched_modules_share_the_same_parameters():
    ref = make_ref("gpt2-lm")
    params = {n: p for n, p in ref.named_parameters()}
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)  # optimizer state keys on these objects
    fl.patch(ref)
    mlp = ref.transformer.h[0].mlp
    assert type(mlp.c_fc).__name__ == "FastConv1D" and isinstance(mlp.c_fc, hf.pytorch_utils.Conv1D)
    assert mlp.c_fc.activation == "gelu_tanh" and isinstance(mlp.act, torch.nn.Identity)
    assert isinstance(ref.transformer.ln_f, fl.nn.LayerNorm)
    assert mlp.c_fc.weight.shape == (24, 96), "Conv1D keeps its (in, out) layout"
    assert all(p is params[n] for n, p in ref.named_parameters()), "a patched module holds a new Parameter"
    ref(input_ids=torch.randint(1, 61, (2, 5))).logits.sum().backward()
    opt.step()
    assert all(params[n] in opt.state for n in params)


def test_hooks_registered_before_patching_keep_firing():
    ref = make_ref("bert-base")
    seen = []
    ref.encoder.layer[0].output.LayerNorm.register_forward_hook(lambda m, a, out: seen.append(isinstance(m, fl.nn.LayerNorm)))
    fl.patch(ref)
    ref(input_ids=torch.randint(3, 50, (1, 4)))
    fl.unpatch(ref)
    ref(input_ids=torch.randint(3, 50, (1, 4)))
    assert seen == [True, False], "the hook did not fire on the patched module, then on the original"


def test_a_forward_the_table_no_longer_matches_is_an_error_or_skipped(monkeypatch):
    """A transformers release whose MLP forward changed: strict raises, strict=False patches the rest
    and leaves the pairs it cannot vouch for unfused."""
    monkeypatch.setattr(sys.modules["fastlayers.patch"], "_reads_act_of_linear", lambda cls, lin, act: False)
    with pytest.raises(RuntimeError, match="no longer reads"):
        fl.patch(make_ref("gpt2-lm"))
    ref = make_ref("gpt2-lm")
    pat = fl.patch(copy.deepcopy(ref), strict=False)
    rep = pat.fastlayers_patch_report
    assert rep.family == "GPT-2" and any("does not read self.act(self.c_fc(x))" in s for s in rep.skipped)
    assert type(pat.transformer.h[0].mlp.c_fc) is hf.pytorch_utils.Conv1D
    assert isinstance(pat.transformer.h[0].ln_1, fl.nn.LayerNorm)
    kw, fields = make_inputs("gpt2-lm", True)
    with torch.no_grad():
        assert_rel(pat(**kw).logits, ref(**kw).logits, RTOL, "partly patched", mask=fields[0][1])


# ----------------------------------------------------------------------------- padding
def _row_alone_equals_padded(model, family):
    """Row 1 of a padded batch (the same tokens with padding after (BERT, BART) or before (GPT-2)) vs the
    sentence run alone without padding: max abs difference of the token outputs."""
    L, n = 9, 5
    tokens = torch.randint(3, 50, (n,))
    ids = torch.full((2, L), PAD[family])
    m = torch.zeros(2, L, dtype=torch.long)
    ids[0] = torch.randint(3, 50, (L,))
    m[0] = 1
    sl = slice(L - n, L) if family == "gpt2" else slice(0, n)
    ids[1, sl], m[1, sl] = tokens, 1
    kw = dict(input_ids=ids, attention_mask=m)
    alone = dict(input_ids=tokens[None], attention_mask=torch.ones(1, n, dtype=torch.long))
    pos = dict(position_ids=torch.tensor([[0] * (L - n) + list(range(n))] * 2)) if family == "gpt2" else {}
    if family == "bart":
        dec = torch.randint(3, 50, (1, 4))
        kw["decoder_input_ids"], alone["decoder_input_ids"] = dec.expand(2, -1), dec
        field = "encoder_last_hidden_state"
        return (model(**kw)[field][1, sl] - model(**alone)[field][0]).abs().max().item()
    with torch.no_grad():
        batch = model(**kw, **pos).logits[1, sl]
        single = model(**alone).logits[0]
    return (batch - single).abs().max().item()


@pytest.mark.parametrize("name", ["bert-mlm", "gpt2-lm", "bart-cg"])
def test_padding_is_honoured_and_the_mask_function_is_what_does_it(name):
    family = MODELS[name][2]
    _, pat = pair(name)
    with torch.no_grad():
        err = _row_alone_equals_padded(pat, family)
    assert err < 1e-5, f"{name}: a padded row differs from the same sentence alone by {err:.3e}"
    # Negative control: without the mask function transformers passes attention_mask=None and the
    # padding is attended -- the same comparison must then fail.
    saved = AttentionMaskInterface._global_mapping.pop("fastlayers")
    try:
        with torch.no_grad():
            err_without = _row_alone_equals_padded(pat, family)
    finally:
        AttentionMaskInterface._global_mapping["fastlayers"] = saved
    assert err_without > 1e-3, f"{name}: padding made no difference even without the mask function"


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpt2_greedy_generate_left_padded_same_ids(cache):
    ref, pat = pair("gpt2-lm")
    ids, m = left_padded([7, 3, 5, 1], 61)
    kw = dict(max_new_tokens=8, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = hf_generate(ref, ids, m, **kw)
    reset_attention_stats()
    got = pat.generate(ids, attention_mask=m, do_sample=False, **kw)
    assert torch.equal(got, want)
    assert fl_calls() == 8 * 2  # one prefill + 7 decode steps, 2 layers


def test_bart_greedy_generate_padded_encoder_same_ids():
    ref, pat = pair("bart-cg")
    src = torch.randint(3, 50, (3, 8))
    m = torch.ones(3, 8, dtype=torch.long)
    m[1, 5:] = 0
    m[2, 2:] = 0
    src = src.masked_fill(m == 0, 1)
    kw = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1)
    want = hf_generate(ref, src, m, **kw)
    reset_attention_stats()
    got = pat.generate(src, attention_mask=m, do_sample=False, **kw)
    assert torch.equal(got, want)
    assert fl_calls() == 2 + 6 * 2 * 2  # encoder once; per step 2 decoder layers x (self + cross)


# ----------------------------------------------------------------------------- unpatch, save, training
def test_unpatch_restores_modules_attention_and_outputs():
    ref = make_ref("bart-cg")
    ref.set_attn_implementation("sdpa")
    before = {n: m for n, m in ref.named_modules()}
    kw, fields = make_inputs("bart-cg", True)
    with torch.no_grad():
        want = ref(**kw).logits
    fl.patch(ref)
    assert isinstance(ref.model.encoder.layers[0].fc1, fl.nn.Linear)
    assert isinstance(ref.model.encoder.layers[0].final_layer_norm, fl.nn.LayerNorm)
    fl.unpatch(ref)
    after = {n: m for n, m in ref.named_modules()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before), "not the original modules"
    assert ref.config._attn_implementation == "sdpa"
    assert not hasattr(ref, "fastlayers_patch_report")
    with torch.no_grad():
        assert torch.equal(ref(**kw).logits, want)
    with pytest.raises(ValueError, match="not patched"):
        fl.unpatch(ref)


def test_save_pretrained_loads_in_transformers(tmp_path):
    ref, pat = pair("gpt2-lm")
    pat.save_pretrained(tmp_path)
    assert "fastlayers" not in (tmp_path / "config.json").read_text()
    loaded = hf.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert type(loaded.transformer.h[0].mlp.c_fc) is hf.pytorch_utils.Conv1D
    sd = ref.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    ids = torch.randint(1, 61, (2, 7))
    with torch.no_grad():
        assert_rel(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, RTOL, "reloaded logits")


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")  # renamed in 5.2x, kept
def test_training_with_gradient_checkpointing_matches():
    """train() mode, gradient checkpointing, three AdamW steps: the same losses as transformers."""
    ref, pat = pair("bert-mlm")
    kw, _ = make_inputs("bert-mlm", True)
    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    losses = []
    for model in (ref, pat):
        model.gradient_checkpointing_enable()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        run = []
        for _ in range(3):
            loss = model(**kw, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_attention_dropout_only_in_training(monkeypatch):
    _, pat = pair("bert-mlm", attention_probs_dropout_prob=0.25)
    seen = []
    real = fl.attention

    def spy(*a, **kw):
        seen.append(kw["dropout_p"])
        return real(*a, **kw)
    monkeypatch.setattr(fl, "attention", spy)
    kw, _ = make_inputs("bert-mlm", True)
    pat.train()(**kw)
    pat.eval()(**kw)
    assert seen == [0.25, 0.25, 0.0, 0.0]


def test_backend_argument_reaches_every_op():
    _, pat = pair("bert-mlm")
    fl.unpatch(pat)
    fl.patch(pat, backend="torch")
    assert pat.config._attn_implementation == ATTN_NAMES["torch"] == "fastlayers_torch"
    assert pat.bert.encoder.layer[0].intermediate.dense.backend == "torch"
    pat(**make_inputs("bert-mlm", True)[0])
    assert fl.last_backend("attention") == fl.last_backend("linear") == fl.last_backend("layer_norm") == "torch"
    with pytest.raises(ValueError, match="already patched"):
        fl.patch(pat)
    with pytest.raises(ValueError, match="backend"):
        fl.patch(make_ref("bert-mlm"), backend="tpu")


# ----------------------------------------------------------------------------- outside the table, fallbacks
def electra():
    cfg = hf.ElectraConfig(vocab_size=50, embedding_size=16, hidden_size=24, num_attention_heads=3,
                           num_hidden_layers=2, intermediate_size=37, max_position_embeddings=20, **NO_DROP)
    m = hf.ElectraForMaskedLM(cfg)
    perturb_(m)
    m.set_attn_implementation("eager")
    return m.eval()


def test_transformers_older_than_the_interfaces_is_refused(monkeypatch):
    # (4.57's BERT / GPT-2 / BART build their own SDPA masks: MIN_TRANSFORMERS is 5.0.0; here the
    # installed version is made "too old" by raising the bar)
    monkeypatch.setattr(sys.modules["fastlayers.patch"], "MIN_TRANSFORMERS", "99.0")
    with pytest.raises(RuntimeError, match=r"transformers >= 99\.0 .*found"):
        fl.patch(make_ref("bert-base"))


def test_a_model_outside_the_table_raises_listing_the_families():
    with pytest.raises(ValueError) as e:
        fl.patch(electra())
    for name in ("BERT", "RoBERTa", "GPT-2", "BART", "strict=False"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="not in fastlayers' table"):
        fl.patch(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.LayerNorm(4)))


def test_strict_false_patches_the_generic_pieces_and_reports_them(caplog):
    ref = electra()
    pat = copy.deepcopy(ref)
    with caplog.at_level(logging.INFO, logger="fastlayers.patch"):
        fl.patch(pat, strict=False)
    rep = pat.fastlayers_patch_report
    assert rep.family is None and rep.attention == "eager -> fastlayers"
    counts = rep.counts()
    assert counts["LayerNorm -> fl.nn.LayerNorm"] == 6  # embeddings, 2 x 2 per layer, generator head
    assert counts["Linear + GELUActivation -> fastlayers Linear(activation='gelu')"] == 3  # 2 intermediates + head
    assert "fl.patch: generic" in caplog.text
    kw, fields = make_inputs("bert-mlm", True)
    reset_attention_stats()
    with torch.no_grad():
        assert_rel(pat(**kw).logits, ref(**kw).logits, RTOL, "electra logits", mask=fields[0][1])
    assert fl_calls() == 2
    # A plain torch module: no attention interface, the LayerNorm only (nn.Sequential's forward is no
    # act(linear(x)) the source shows)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.LayerNorm(4))
    fl.patch(seq, strict=False)
    assert isinstance(seq[2], fl.nn.LayerNorm) and type(seq[0]) is torch.nn.Linear
    assert any(s.startswith("attention:") for s in seq.fastlayers_patch_report.skipped)
    fl.unpatch(seq)
    assert type(seq[2]) is torch.nn.LayerNorm


def test_inexpressible_masks_fall_back_to_sdpa_and_are_counted():
    """Packed sequences (position_ids that restart, no attention_mask) and a user's 4-D mask are no
    key-padding pattern: transformers' sdpa runs those calls, and the results stay exact."""
    ref, pat = pair("gpt2-lm")
    ids = torch.randint(1, 61, (2, 8))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    reset_attention_stats()
    with torch.no_grad():
        # no cache (use_cache=False): transformers detects packing only then
        got = pat(input_ids=ids, position_ids=packed, use_cache=False).logits
        assert_rel(got, ref(input_ids=ids, position_ids=packed, use_cache=False).logits, RTOL, "packed")
        plain = ref(input_ids=ids, use_cache=False).logits
        assert (got[:, 3:] - plain[:, 3:]).abs().max() > 1e-3, "the packing made no difference: the test proves nothing"
    stats = attention_stats()
    assert stats.get("fastlayers", 0) == 0 and sum(v for k, v in stats.items() if k.startswith("sdpa:")) == 2
    assert any(k.startswith("mask: a mask pattern other than") for k in stats)
    # a prepared 4-D float mask (block-diagonal here): passed as it is, run by sdpa
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed[4:, :4] = False
    mask4 = torch.zeros(2, 1, 8, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
    reset_attention_stats()
    with torch.no_grad():
        assert_rel(pat(input_ids=ids, attention_mask=mask4).logits, ref(input_ids=ids, attention_mask=mask4).logits,
                   RTOL, "4-D mask")
    assert attention_stats() == {"sdpa: a 4-D attention mask": 2}


def test_torch_compile_fullgraph_of_a_patched_model():
    """The mask and attention functions trace without a graph break (no host read while compiling):
    GPT-2, causal with left and right padding (~10 s of dynamo on CPU)."""
    name = "gpt2-lm"
    ref, pat = pair(name)
    kw, fields = make_inputs(name, True)
    torch._dynamo.reset()
    compiled = torch.compile(pat, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_rel(compiled(**kw).logits, ref(**kw).logits, RTOL, f"compiled {name}", mask=fields[0][1])
