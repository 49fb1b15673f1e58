"""GPT-2 (fastlayers.models.gpt2) against Hugging Face transformers, whole model, llm.c style.

Each case builds a transformers GPT-2 on a tiny random config (tests/gpt2_helpers.CONFIGS: varied
n_embd / n_head (head_dim 7 and 12 too), n_layer, n_positions, n_inner, layer_norm_epsilon,
activation, and the three attention-scaling flags), perturbs every weight (LayerNorm weights off 1,
biases off 0), saves it with transformers' `save_pretrained`, loads it with fastlayers'
`from_pretrained`, and compares on the non-padded positions of batches with a full, a right-padded,
a left-padded and one-token rows:
  - forward (eval, fp32): GPT2Model last_hidden_state, every hidden state and attention map,
    GPT2LMHeadModel logits, GPT2ForSequenceClassification logits (pad_token_id set, left- and
    right-padded rows) within 1e-5 relative; with position_ids, token_type_ids, inputs_embeds;
  - train() without dropout: the loss and every parameter gradient (by checkpoint name: our
    Conv1DLinear holds W^T, state_dict()/the gradient map give the checkpoint's (in, out)) within
    1e-4, then a few SGD steps' losses; dropout follows train()/eval();
  - save/load both ways, state_dict keys, generation_config.json, old mask buffers, untied
    embeddings, config fields refused by name;
  - the Triton backend (interpreter on CPU), torch.compile(fullgraph=True).
GPU tests (marker gpu): bf16/fp16 within 3x transformers' own same-dtype error vs its fp32 output.
Generation: tests/test_generation.py.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers as hf

import fastlayers as fl
from fastlayers import models as flm
from gpt2_helpers import CONFIGS, NO_DROPOUT, PAD, checkpoint, hf_config, make_inputs
from model_helpers import (assert_layers_match, assert_loss_and_grads_match, assert_rel, assert_trains_like,
                           assert_unsupported_field_raises, gpu_backend_or_skip, grads_by_checkpoint_name)

FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4


# head -> (transformers class, fastlayers class, config overrides)
HEADS = {
    "base": (hf.GPT2Model, flm.GPT2Model, {}),
    "lm": (hf.GPT2LMHeadModel, flm.GPT2LMHeadModel, {}),
    "seq-cls": (hf.GPT2ForSequenceClassification, flm.GPT2ForSequenceClassification,
                dict(num_labels=3, pad_token_id=PAD)),
}
MODES = ("ids", "positions", "types", "embeds", "bare")


def _checkpoint(tmp_path, config_name, head, **overrides):
    hf_cls, fl_cls, head_kw = HEADS[head]
    cfg = hf_config(config_name, **{**head_kw, **overrides})
    d = tmp_path / f"{config_name}-{head}"
    return checkpoint(d, hf_cls, cfg), fl_cls, d


def _inputs(cfg, mode, B=5, L=9):
    """mode: "ids" (ids + padding mask), "positions" (+ position_ids), "types" (+ token_type_ids),
    "embeds" (inputs_embeds instead of ids), "bare" (full rows, input_ids only)."""
    kw = make_inputs(cfg, B=B, L=L, mask=mode != "bare", types=mode == "types", positions=mode == "positions")
    if mode == "embeds":
        ids = kw.pop("input_ids")
        kw["inputs_embeds"] = torch.randn(*ids.shape, cfg.n_embd)
    return kw


def _token_mask(inputs):
    m = inputs.get("attention_mask")
    if m is None:
        ref = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"][..., 0]
        return torch.ones(ref.shape, dtype=torch.bool)
    return m.bool()


def _compare(got, want, head, inputs, cfg, rtol=FWD_RTOL):
    mask = _token_mask(inputs)
    if head == "base":
        assert_rel(got.last_hidden_state, want.last_hidden_state, rtol, "last_hidden_state", mask=mask)
    elif head == "lm":
        assert_rel(got.logits, want.logits, rtol, "logits", mask=mask)
    else:  # pooled at each row's last non-pad token: every row compared
        assert got.logits.shape == (mask.shape[0], cfg.num_labels)
        assert_rel(got.logits, want.logits, rtol, "sequence logits")
    assert_layers_match(got, want, rtol, mask, cfg.n_layer)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_forward_matches_transformers(tmp_path, config_name, head):
    ref, fl_cls, d = _checkpoint(tmp_path, config_name, head)
    model = fl_cls.from_pretrained(d)
    assert not model.training, "from_pretrained returns the model in eval mode"
    assert model.loading_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    for mode in MODES:
        inputs = _inputs(ref.config, mode)
        with torch.no_grad():
            want = ref(**inputs, output_hidden_states=True, output_attentions=True)
            got = model(**inputs, output_hidden_states=True, output_attentions=True)
        _compare(got, want, head, inputs, ref.config)
    assert fl.last_backend("linear") == fl.last_backend("layer_norm") == fl.last_backend("attention") == "torch"


def test_sequence_classification_picks_each_rows_last_token(tmp_path):
    """Left- and right-padded rows pool different positions: each must equal that row alone."""
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "seq-cls")
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "ids")
    # left-padded rows count positions from their first token, as generate does
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(**inputs, position_ids=positions).logits
        for b in range(inputs["input_ids"].shape[0]):
            keep = inputs["attention_mask"][b].bool()
            alone = model(input_ids=inputs["input_ids"][b][keep][None]).logits[0]
            assert_rel(batch[b], alone, FWD_RTOL, f"row {b} in the padded batch vs alone")
        with pytest.raises(ValueError, match="pad_token_id"):
            flm.GPT2ForSequenceClassification.from_pretrained(d, pad_token_id=None)(inputs["input_ids"])


def test_position_ids_change_the_output(tmp_path):
    """position_ids reach wpe (a model ignoring them would pass the other tests only by luck)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "base")
    model = fl_cls.from_pretrained(d)
    kw = _inputs(ref.config, "bare", B=2, L=6)
    with torch.no_grad():
        a = model(**kw).last_hidden_state
        b = model(**kw, position_ids=torch.arange(6).expand(2, 6) + 3).last_hidden_state
        c = model(**kw, position_ids=torch.arange(6)[None]).last_hidden_state     # (1, L) broadcasts
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(a, c)


def test_output_access_like_transformers(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "ids")
    labels = _labels(ref.config, "lm", inputs)
    with torch.no_grad():
        out = model(**inputs, **labels)
        plain = model(**inputs)
        tup = model(**inputs, **labels, return_dict=False)
        want = ref(**inputs, **labels, return_dict=False)
    assert out[0] is out.loss and out["logits"] is out.logits and plain[0] is plain.logits
    assert list(out.keys()) == ["loss", "logits"]
    assert isinstance(tup, tuple) and len(tup) == 2 and torch.equal(tup[1], out.logits)
    assert_rel(tup[0], want[0], FWD_RTOL, "loss from the tuple")


def test_bad_inputs_raise_naming_the_argument(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e16-4x4-relu-noscale", "lm")
    model = fl_cls.from_pretrained(d)
    ids = torch.randint(1, 31, (2, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(1, 31, (2, ref.config.n_positions + 1)))              # longer than n_positions
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(input_ids=ids, inputs_embeds=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------ training
def _labels(cfg, head, inputs):
    mask = _token_mask(inputs)
    B, L = mask.shape
    if head == "lm":
        # labels[t] is predicted by logits[t - 1]: a label after a padded position (a left-padded
        # row's first token) would score the logits of a padding query, which attends no key and
        # is unspecified (transformers returns whatever its mask arithmetic gives), so it is -100
        y = torch.randint(0, cfg.vocab_size, (B, L))
        after_pad = torch.zeros_like(mask)
        after_pad[:, 1:] = ~mask[:, :-1]
        return {"labels": y.masked_fill(~mask | after_pad | (torch.rand(B, L) < 0.2), -100)}
    if head == "seq-cls":
        return {"labels": torch.randint(0, cfg.num_labels, (B,))}
    return {}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_loss_and_gradients_match_transformers(tmp_path, config_name, head):
    ref, fl_cls, d = _checkpoint(tmp_path, config_name, head, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    # dropout turned off through config overrides on both sides: train() must then be deterministic
    ref = type(ref).from_pretrained(d, attn_implementation="eager", **NO_DROPOUT).train()
    model = fl_cls.from_pretrained(d, **NO_DROPOUT).train()
    assert model.training and all(getattr(model.config, k) == 0.0 for k in NO_DROPOUT)
    inputs = _inputs(ref.config, "positions" if head != "seq-cls" else "ids")
    labels = _labels(ref.config, head, inputs)
    want = ref(**inputs, **labels)
    got = model(**inputs, **labels)
    if head == "base":  # no loss: a fixed random projection of the non-padded outputs
        w = torch.randn_like(want.last_hidden_state) * _token_mask(inputs)[..., None]
        loss_ref, loss = (want.last_hidden_state * w).sum(), (got.last_hidden_state * w).sum()
    else:
        loss_ref, loss = want.loss, got.loss
        assert loss is not None and loss.dim() == 0 and loss.dtype == torch.float32
    assert_loss_and_grads_match(ref, model, loss_ref, loss, GRAD_RTOL)


def test_training_steps_match_transformers(tmp_path):
    """Five SGD steps of causal-LM training: the same losses (llm.c's test_gpt2 in small)."""
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    model = fl_cls.from_pretrained(d).train()
    ref.train()
    inputs = _inputs(ref.config, "ids")
    labels = _labels(ref.config, "lm", inputs)
    assert_trains_like(ref, model, inputs, labels, GRAD_RTOL, lr=0.3)
    # the tie survived training: one tensor for wte and lm_head
    assert model.lm_head.weight is model.transformer.wte.weight


def test_dropout_follows_train_and_eval(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm", resid_pdrop=0.3, embd_pdrop=0.3,
                                 attn_pdrop=0.3)
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "ids")
    mask = _token_mask(inputs)
    with torch.no_grad():
        e1 = model(**inputs).logits
        assert torch.equal(e1, model(**inputs).logits), "eval() must be deterministic"
        assert_rel(e1, ref(**inputs).logits, FWD_RTOL, "eval logits with dropout configured", mask=mask)
        model.train()
        t1 = model(**inputs).logits
        t2 = model(**inputs).logits
        assert (t1 - e1)[mask].abs().max() > 1e-2, "train() with dropout 0.3 gave the eval output"
        assert (t1 - t2)[mask].abs().max() > 1e-2, "two train() forwards drew the same dropout"
        for only in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):   # each rate acts on its own
            kw = {k: (0.3 if k == only else 0.0) for k in NO_DROPOUT}
            one = fl_cls.from_pretrained(d, **kw).train()
            assert (one(**inputs).logits - e1)[mask].abs().max() > 1e-3, f"{only}=0.3 had no effect in train()"
        with pytest.raises(ValueError, match="output_attentions"):
            model(**inputs, output_attentions=True)
        model.eval()
        assert torch.equal(model(**inputs).logits, e1), "eval() after train() differs"


def test_gradient_checkpointing_same_gradients(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    inputs = _inputs(ref.config, "ids")
    labels = _labels(ref.config, "lm", inputs)
    grads = []
    for ckpt in (False, True):
        model = fl_cls.from_pretrained(d).train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(**inputs, **labels).loss.backward()
        grads.append(grads_by_checkpoint_name(model))
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------ save / load
@torch.no_grad()
def test_transformers_loads_what_we_save(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e36-3x12-gelu-invlayer", "lm")
    model = fl_cls.from_pretrained(d)
    with torch.no_grad():               # change our weights, so a stale file would be caught
        model.transformer.h[1].attn.c_attn.weight.mul_(1.5)
        model.transformer.h[0].mlp.c_fc.bias.add_(0.3)
    out = tmp_path / "ours"
    model.save_pretrained(out)
    back, info = hf.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.n_inner == 50 and back.config.scale_attn_by_inverse_layer_idx is True
    assert back.config.activation_function == "gelu" and back.config.layer_norm_epsilon == 1e-3
    inputs = _inputs(ref.config, "ids")
    want = back.eval()(**inputs).logits
    assert_rel(model(**inputs).logits, want, FWD_RTOL, "logits of transformers on our checkpoint",
               mask=_token_mask(inputs))
    assert (want - ref(**inputs).logits)[_token_mask(inputs)].abs().max() > 1e-3, "our edits were not saved"
    # and we load our own file to the same numbers
    again = fl_cls.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.parametrize("head", list(HEADS))
def test_state_dict_keys_and_shapes_are_the_checkpoints(tmp_path, head):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", head)
    model = fl_cls.from_pretrained(d)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    for k, v in ref.state_dict().items():                # Conv1D (in, out) layout, values included
        assert torch.equal(model.state_dict()[k], v), k
    # load_state_dict takes the checkpoint's names and (in, out) layout back
    fresh = fl_cls(model.config)
    fresh.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_we_load_transformers_sharded_and_bin_checkpoints(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    inputs = _inputs(ref.config, "ids")
    want = ref(**inputs).logits.detach()
    got = fl_cls.from_pretrained(tmp_path / "sharded")(**inputs).logits.detach()
    assert_rel(got, want, FWD_RTOL, "sharded checkpoint logits", mask=_token_mask(inputs))
    # pytorch_model.bin, as transformers 4.x wrote it (Conv1D (in, out), tied lm_head included)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((d / "config.json").read_text())
    torch.save({k: v.clone() for k, v in ref.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    got = fl_cls.from_pretrained(tmp_path / "bin")(**inputs).logits.detach()
    assert_rel(got, want, FWD_RTOL, "pytorch_model.bin logits", mask=_token_mask(inputs))
    # the base model loads the LM checkpoint (head reported unused) and the LM head a base checkpoint
    base = flm.GPT2Model.from_pretrained(d)
    assert base.loading_info["unexpected_keys"] in ([], ["lm_head.weight"])
    body = tmp_path / "body"
    ref.transformer.save_pretrained(body)
    lm = flm.GPT2LMHeadModel.from_pretrained(body)
    assert_rel(lm(**inputs).logits.detach(), want, FWD_RTOL, "LM head from a base checkpoint (tied)",
               mask=_token_mask(inputs))


def test_generation_config_round_trip(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    gen = dict(max_new_tokens=7, repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=[5, 9],
               pad_token_id=PAD, top_k=11, temperature=0.7, do_sample=True)
    (d / "generation_config.json").write_text(json.dumps(gen))
    model = fl_cls.from_pretrained(d)
    for k, v in gen.items():
        assert getattr(model.generation_config, k) == v, k
    out = tmp_path / "ours"
    model.save_pretrained(out)
    theirs = hf.GenerationConfig.from_pretrained(out)
    for k, v in gen.items():
        assert getattr(theirs, k) == v, f"transformers reads {k}={getattr(theirs, k)!r} from our file"
    again = fl_cls.from_pretrained(out)
    assert again.generation_config.to_dict() == model.generation_config.to_dict()
    # without the file: the model config's token ids, transformers' defaults otherwise
    (d / "generation_config.json").unlink()
    plain = fl_cls.from_pretrained(d).generation_config
    assert plain.max_length is None and plain.max_new_tokens is None and plain.do_sample is False   # 20 new tokens
    assert plain.eos_token_id == ref.config.eos_token_id


def test_old_checkpoint_mask_buffers_are_ignored(tmp_path):
    """GPT-2 checkpoints from transformers 2.x-4.x carry attn.bias (the causal mask) and
    attn.masked_bias buffers: loaded silently, not reported."""
    from safetensors.torch import load_file, save_file
    ref, fl_cls, d = _checkpoint(tmp_path, "e16-4x4-relu-noscale", "lm")
    sd = load_file(str(d / "model.safetensors"))
    n = ref.config.n_positions
    for i in range(ref.config.n_layer):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = fl_cls.from_pretrained(d)
    assert model.loading_info["unexpected_keys"] == [], model.loading_info
    inputs = _inputs(ref.config, "ids")
    assert_rel(model(**inputs).logits.detach(), ref(**inputs).logits.detach(), FWD_RTOL, "logits",
               mask=_token_mask(inputs))


def test_untied_word_embeddings(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm", tie_word_embeddings=False)
    assert not torch.equal(ref.lm_head.weight, ref.transformer.wte.weight)
    model = fl_cls.from_pretrained(d)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    inputs = _inputs(ref.config, "ids")
    assert_rel(model(**inputs).logits.detach(), ref(**inputs).logits.detach(), FWD_RTOL, "untied logits",
               mask=_token_mask(inputs))
    out = tmp_path / "ours"
    model.save_pretrained(out)
    back = hf.GPT2LMHeadModel.from_pretrained(out)
    assert back.config.tie_word_embeddings is False
    assert torch.equal(back.lm_head.weight, ref.lm_head.weight)
    # and a tied model saves no lm_head.weight (transformers re-ties it)
    from safetensors.torch import load_file
    tied = flm.GPT2LMHeadModel.from_pretrained(_checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")[2])
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))


@pytest.mark.parametrize("field,value", [("activation_function", "swish"), ("add_cross_attention", True),
                                         ("n_embd", 25)])
def test_unsupported_config_fields_raise_naming_the_field(tmp_path, field, value):
    _, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    assert_unsupported_field_raises(d, fl_cls, flm.GPT2Config, field, value)


def test_auto_classes_pick_gpt2(tmp_path):
    ref, _, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm")
    assert type(flm.AutoModelForCausalLM.from_pretrained(d)) is flm.GPT2LMHeadModel
    assert type(flm.AutoModel.from_pretrained(d)) is flm.GPT2Model
    assert type(flm.AutoConfig.from_pretrained(d)) is flm.GPT2Config


# ------------------------------------------------------------------------------------ backends
def test_triton_backend_runs_the_whole_model(tmp_path):
    """One tiny config through the Triton kernels (the interpreter on CPU: slow, so tiny)."""
    info = fl.available_backends()["triton"]
    if not info["available"]:
        pytest.skip(f"triton backend not available here: {info['reason']}")
    # head_dim 8: the Triton attention takes multiples of 8 (an explicit backend never falls back)
    ref, fl_cls, d = _checkpoint(tmp_path, "e24-3x8-gelu_new", "lm", n_layer=1, n_embd=16, n_head=2)
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "ids", B=3, L=5)
    with torch.no_grad():
        want = ref(**inputs).logits
        got_torch = model(**inputs).logits
        with fl.use_backend("triton"):
            got = model(**inputs).logits
            for op in ("linear", "layer_norm", "attention"):
                assert fl.last_backend(op) == "triton", f"{op} ran on {fl.last_backend(op)!r}"
    assert not torch.equal(got, got_torch), "triton gave bit-identical logits: did it run?"
    assert_rel(got, want, 1e-5, "triton logits", mask=_token_mask(inputs), atol=1e-5)


def test_torch_compile_fullgraph_matches_eager(tmp_path):
    ref, fl_cls, d = _checkpoint(tmp_path, "e35-5x7-tanh-upcast", "lm", n_layer=1)
    model = fl_cls.from_pretrained(d)
    inputs = _inputs(ref.config, "ids", B=3, L=7)
    labels = _labels(ref.config, "lm", inputs)
    # aot_eager: traces the whole model through the ops' fake implementations (fullgraph: no graph
    # break anywhere) without inductor's C++ build, which costs ~45 s on a CPU runner
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(**inputs, **labels)
        got = compiled(**inputs, **labels)
    mask = _token_mask(inputs)
    assert_rel(got.logits, eager.logits, 1e-5, "compiled logits", mask=mask)
    assert_rel(got.loss, eager.loss, 1e-5, "compiled loss")


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_half_precision_within_3x_transformers_error(tmp_path, backend, dtype):
    """Our bf16/fp16 logits vs transformers' fp32 within 3x transformers' own error at the same
    dtype (non-padded positions of a left/right-padded batch), every op on the requested backend."""
    gpu_backend_or_skip(backend)
    # head_dim 64 (a CUDA kernel head dim); eager attention in the references: causal + left padding
    # leaves padding queries with no key, which SDPA may turn into NaN rows (ignored, but NaN K/V
    # would then reach the next layer through zero probabilities)
    cfg = hf_config("e24-3x8-gelu_new", n_embd=256, n_head=4, n_layer=4, vocab_size=1000, n_positions=160)
    ref32 = hf.GPT2LMHeadModel(cfg)
    with torch.no_grad():   # mild perturbation: biases and LayerNorm off their init, values stay O(1)
        for p in ref32.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path / "ckpt"
    ref32.save_pretrained(d)
    ref32 = ref32.cuda().eval()
    ref_half = hf.GPT2LMHeadModel.from_pretrained(d, dtype=dtype, attn_implementation="eager").cuda().eval()
    model = flm.GPT2LMHeadModel.from_pretrained(d, dtype=dtype, device="cuda")
    assert model.dtype == dtype and model.device.type == "cuda"
    inputs = {k: v.cuda() for k, v in make_inputs(cfg, B=6, L=150).items()}
    mask = _token_mask(inputs)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            want = ref32(**inputs).logits[mask].double()
            theirs = ref_half(**inputs).logits[mask].double()
            with fl.use_backend(backend):
                got = model(**inputs).logits
                for op in ("linear", "layer_norm", "attention"):
                    assert fl.last_backend(op) == backend, f"{op} ran on {fl.last_backend(op)!r}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert got.dtype == dtype
    got = got[mask].double()
    assert torch.isfinite(got).all()
    err, base = (got - want).abs().max().item(), (theirs - want).abs().max().item()
    assert base > 0, "transformers' half-precision run equals its fp32 run: the check proves nothing"
    assert err <= 3 * base, f"{backend} {dtype}: max error {err:.3e} > 3x transformers' own {base:.3e}"
