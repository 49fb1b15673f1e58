"""Checkpoints <-> fastlayers models (models/loading.py, config.py, auto.py), against transformers.

Round trips in both directions (safetensors, sharded safetensors, pytorch_model.bin, legacy
gamma/beta names, untied MLM decoder), base <-> head loading with transformers' init of a new
head, every error the loader and the config raise (one message listing every problem), config
keys kept through a save, and the Auto classes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as hf
from safetensors.torch import load_file, save_file

from fastlayers import models as flm
from fastlayers.models import CheckpointError, ConfigError
from model_helpers import assert_rel, hf_config, hf_model, make_inputs, token_mask

RTOL = 1e-5

# head -> (transformers class, transformers Auto class, fastlayers class, fastlayers Auto class, config kw)
HEADS = {
    "base": (hf.BertModel, hf.AutoModel, flm.BertModel, flm.AutoModel, {}),
    "masked-lm": (hf.BertForMaskedLM, hf.AutoModelForMaskedLM, flm.BertForMaskedLM, flm.AutoModelForMaskedLM, {}),
    "seq": (hf.BertForSequenceClassification, hf.AutoModelForSequenceClassification,
            flm.BertForSequenceClassification, flm.AutoModelForSequenceClassification, dict(num_labels=3)),
    "token": (hf.BertForTokenClassification, hf.AutoModelForTokenClassification, flm.BertForTokenClassification,
              flm.AutoModelForTokenClassification, dict(num_labels=4)),
    "qa": (hf.BertForQuestionAnswering, hf.AutoModelForQuestionAnswering, flm.BertForQuestionAnswering,
           flm.AutoModelForQuestionAnswering, {}),
    "choice": (hf.BertForMultipleChoice, hf.AutoModelForMultipleChoice, flm.BertForMultipleChoice,
               flm.AutoModelForMultipleChoice, {}),
}
MAIN = {"base": "last_hidden_state", "qa": "start_logits"}


def _hf_checkpoint(path: Path, head: str = "base", config_name: str = "h24-3x8-gelu", **kw):
    hf_cls, _, _, _, head_kw = HEADS[head]
    ref = hf_model(hf_cls, hf_config(config_name, **{**head_kw, **kw}))
    ref.save_pretrained(path)
    return ref


def _inputs(cfg, head="base"):
    kw = make_inputs(cfg, B=6 if head == "choice" else 4, L=8)
    if head == "choice":
        kw = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in kw.items()}
    return kw


def _assert_same_outputs(a, b, head, inputs, what, rtol=RTOL):
    """a, b: models (either library) in eval mode; compares the head's main output (and the base's
    pooler) on non-padded positions."""
    with torch.no_grad():
        oa, ob = a(**inputs), b(**inputs)
    name = MAIN.get(head, "logits")
    per_token = head in ("base", "masked-lm", "token", "qa")
    flat = {k: (v.flatten(0, 1) if head == "choice" else v) for k, v in inputs.items()}
    assert_rel(getattr(oa, name), getattr(ob, name), rtol, f"{what}: {name}",
               mask=token_mask(flat) if per_token else None)
    if head == "base":
        assert_rel(oa.pooler_output, ob.pooler_output, rtol, f"{what}: pooler_output")
    if head == "qa":
        assert_rel(oa.end_logits, ob.end_logits, rtol, f"{what}: end_logits", mask=token_mask(flat))


def _rewrite_safetensors(d: Path, fn):
    """Applies fn to the {name: tensor} of d/model.safetensors and writes it back."""
    sd = dict(load_file(str(d / "model.safetensors")))
    sd = fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def _body(sd, prefix=""):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("head", list(HEADS))
def test_fastlayers_save_transformers_load(tmp_path, head):
    """transformers save -> fastlayers load -> fastlayers save -> transformers Auto* and BertFor*
    load (no missing or unexpected keys) -> the same outputs as the original and ours."""
    hf_cls, hf_auto, fl_cls, _, _ = HEADS[head]
    ref = _hf_checkpoint(tmp_path / "hf", head)
    ours = fl_cls.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "fl")
    saved_cfg = json.loads((tmp_path / "fl" / "config.json").read_text())
    assert saved_cfg["architectures"] == [fl_cls.__name__] and saved_cfg["model_type"] == "bert"
    for loader in (hf_auto, hf_cls):
        back, info = loader.from_pretrained(tmp_path / "fl", output_loading_info=True, attn_implementation="eager")
        assert type(back) is hf_cls
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        back.eval()
        inputs = _inputs(ref.config, head)
        _assert_same_outputs(back, ref, head, inputs, f"{loader.__name__} of our save vs the original")
        _assert_same_outputs(ours, back, head, inputs, f"ours vs {loader.__name__} of our save")


def test_fresh_fastlayers_model_loads_in_transformers(tmp_path):
    """A model built from a fastlayers config (our init, our config.json) -> transformers."""
    cfg = flm.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=16, type_vocab_size=3, hidden_act="gelu_new")
    ours = flm.BertForMaskedLM(cfg).eval()
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    ours.save_pretrained(tmp_path)
    back, info = hf.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert back.config.type_vocab_size == 3 and back.config.hidden_act == "gelu_new"
    _assert_same_outputs(ours, back.eval(), "masked-lm", _inputs(back.config), "fresh model in transformers")


@pytest.mark.parametrize("head", ["base", "masked-lm", "seq"])
def test_transformers_save_fastlayers_load_save_load(tmp_path, head):
    ref = _hf_checkpoint(tmp_path / "a", head)
    fl_cls = HEADS[head][2]
    first = fl_cls.from_pretrained(tmp_path / "a")
    first.save_pretrained(tmp_path / "b")
    second = fl_cls.from_pretrained(tmp_path / "b")
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sorted(sd1) == sorted(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    hf_sd = ref.state_dict()
    for k in hf_sd:
        assert torch.equal(sd2[k], hf_sd[k]), f"{k} changed through load/save/load"
    assert second.config.to_dict() == first.config.to_dict()


@pytest.mark.parametrize("head", list(HEADS))
def test_state_dict_keys_are_the_checkpoints(head):
    hf_cls, _, fl_cls, _, kw = HEADS[head]
    cfg = hf_config(**kw)
    ours = fl_cls(flm.BertConfig.from_dict(cfg.to_dict()))
    theirs = hf_cls(cfg)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for k, v in theirs_sd.items():
        assert tuple(ours_sd[k].shape) == tuple(v.shape), k
    # load_state_dict takes them back (strict) and state_dict gives the same values
    ours.load_state_dict(theirs_sd)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs_sd[k]), k


def test_sharded_safetensors_both_ways(tmp_path):
    ref = hf_model(hf.BertForSequenceClassification, hf_config(num_labels=3))
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    ours = flm.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    inputs = _inputs(ref.config, "seq")
    _assert_same_outputs(ours, ref, "seq", inputs, "from transformers' shards")

    ours.save_pretrained(tmp_path / "fl", max_shard_size="20KB")
    shards = sorted((tmp_path / "fl").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "fl" / "model.safetensors").exists()
    index = json.loads((tmp_path / "fl" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert sorted(index["weight_map"]) == sorted(ref.state_dict())
    for s in shards:   # every shard respects the limit unless it holds a single larger tensor
        n = len(load_file(str(s)))
        assert s.stat().st_size <= 20_000 + 1024 or n == 1, (s.name, s.stat().st_size, n)
    back = hf.BertForSequenceClassification.from_pretrained(tmp_path / "fl").eval()
    _assert_same_outputs(back, ref, "seq", inputs, "transformers from our shards")
    again = flm.BertForSequenceClassification.from_pretrained(tmp_path / "fl")
    _assert_same_outputs(again, ref, "seq", inputs, "ours from our shards")
    # saving unsharded into the same folder removes the stale shards and index
    again.save_pretrained(tmp_path / "fl")
    assert not list((tmp_path / "fl").glob("model-*-of-*.safetensors"))
    assert not (tmp_path / "fl" / "model.safetensors.index.json").exists()
    _assert_same_outputs(flm.BertForSequenceClassification.from_pretrained(tmp_path / "fl"), ref, "seq", inputs,
                         "after re-saving unsharded")


def test_pytorch_model_bin_single_and_sharded(tmp_path):
    ref = hf_model(hf.BertForTokenClassification, hf_config(num_labels=4))
    sd = ref.state_dict()
    single = tmp_path / "single"
    ref.config.save_pretrained(single)
    torch.save(sd, single / "pytorch_model.bin")
    inputs = _inputs(ref.config, "token")
    _assert_same_outputs(flm.BertForTokenClassification.from_pretrained(single), ref, "token", inputs,
                         "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    ref.config.save_pretrained(sharded)
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, sharded / name)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    _assert_same_outputs(flm.BertForTokenClassification.from_pretrained(sharded), ref, "token", inputs,
                         "sharded pytorch_model.bin")


def test_safetensors_preferred_over_bin(tmp_path):
    ref = _hf_checkpoint(tmp_path)
    junk = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    torch.save(junk, tmp_path / "pytorch_model.bin")
    _assert_same_outputs(flm.BertModel.from_pretrained(tmp_path), ref, "base", _inputs(ref.config),
                         "model.safetensors next to a pytorch_model.bin")


def test_legacy_gamma_beta_names(tmp_path):
    ref = _hf_checkpoint(tmp_path, "masked-lm")

    def legacy(sd):
        out = {}
        for k, v in sd.items():
            if "LayerNorm." in k:
                k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            out[k] = v
        return out
    _rewrite_safetensors(tmp_path, legacy)
    names = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.endswith("gamma") for k in names) and not any(k.endswith("LayerNorm.weight") for k in names)
    ours, info = flm.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _assert_same_outputs(ours, ref, "masked-lm", _inputs(ref.config), "legacy gamma/beta")


def test_masked_lm_untied_decoder(tmp_path):
    # transformers 5 unties cls.predictions.decoder.bias from cls.predictions.bias along with the
    # embeddings (4.x kept them one tensor); checkpoints hold equal values, so make them equal
    ref = hf_model(hf.BertForMaskedLM, hf_config(tie_word_embeddings=False))
    with torch.no_grad():
        ref.cls.predictions.bias.copy_(ref.cls.predictions.decoder.bias)
    ref.save_pretrained(tmp_path / "hf")
    assert not torch.equal(ref.cls.predictions.decoder.weight, ref.bert.embeddings.word_embeddings.weight)
    ours = flm.BertForMaskedLM.from_pretrained(tmp_path / "hf")
    assert ours.config.tie_word_embeddings is False
    assert ours.cls.predictions.decoder.weight is not ours.bert.embeddings.word_embeddings.weight
    assert torch.equal(ours.cls.predictions.decoder.weight, ref.cls.predictions.decoder.weight)
    inputs = _inputs(ref.config)
    _assert_same_outputs(ours, ref, "masked-lm", inputs, "untied decoder")
    ours.save_pretrained(tmp_path / "fl")
    saved = load_file(str(tmp_path / "fl" / "model.safetensors"))
    assert "cls.predictions.decoder.weight" in saved and "cls.predictions.decoder.bias" in saved
    back, info = hf.BertForMaskedLM.from_pretrained(tmp_path / "fl", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _assert_same_outputs(back.eval(), ref, "masked-lm", inputs, "untied decoder through our save")


def test_tied_decoder_follows_the_embeddings(tmp_path):
    """Tied (the default): the decoder is the word-embedding Parameter itself, also after .to()."""
    _hf_checkpoint(tmp_path, "masked-lm")
    ours = flm.BertForMaskedLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias
    assert "cls.predictions.decoder.weight" not in load_file(str(tmp_path / "model.safetensors"))


# ------------------------------------------------------------------------------- base <-> head
def test_base_from_head_checkpoint(tmp_path):
    _hf_checkpoint(tmp_path, "masked-lm")
    ref_base = hf.BertModel.from_pretrained(tmp_path).eval()
    ours, info = flm.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] and all(k.startswith("cls.") for k in info["unexpected_keys"]), info
    assert "cls.predictions.transform.dense.weight" in info["unexpected_keys"]
    # a masked-LM checkpoint has no pooler: initialised and reported, as transformers does
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert ours.loading_info == info
    inputs = _inputs(ref_base.config)
    with torch.no_grad():
        assert_rel(ours(**inputs).last_hidden_state, ref_base(**inputs).last_hidden_state, RTOL,
                   "base from a head checkpoint", mask=token_mask(inputs))


def test_base_from_sequence_classification_checkpoint(tmp_path):
    ref = _hf_checkpoint(tmp_path, "seq")
    ours, info = flm.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == ["classifier.bias", "classifier.weight"] and not info["missing_keys"]
    _assert_same_outputs(ours, ref.bert, "base", _inputs(ref.config), "base from a classifier checkpoint")


def _assert_transformers_init(weight, bias, std, what):
    assert abs(weight.mean().item()) < 5 * std / weight.numel() ** 0.5 + 1e-3, f"{what}: mean {weight.mean()}"
    assert 0.8 * std < weight.std().item() < 1.2 * std, f"{what}: std {weight.std().item():.4f}, expected {std}"
    if bias is not None:
        assert torch.equal(bias, torch.zeros_like(bias)), f"{what}: bias not zero"


def test_head_from_base_checkpoint_initialised_as_transformers(tmp_path):
    ref = _hf_checkpoint(tmp_path, "base", hidden_size=48, num_attention_heads=4, initializer_range=0.37)
    ours, info = flm.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=7, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_transformers_init(ours.classifier.weight, ours.classifier.bias, 0.37, "classifier")
    # the body came from the checkpoint: with the same head weights, transformers gives the same logits
    theirs = hf.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=7).eval()
    theirs.classifier.load_state_dict({"weight": ours.classifier.weight, "bias": ours.classifier.bias})
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.bert.state_dict()[k], v), k
    _assert_same_outputs(ours, theirs, "seq", _inputs(ref.config, "seq"), "head from base")


def test_masked_lm_from_base_checkpoint(tmp_path):
    ref = _hf_checkpoint(tmp_path, "base", hidden_size=64, num_attention_heads=4, initializer_range=0.11)
    ours, info = flm.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(
        ["cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
         "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"]), info
    # the base checkpoint's pooler is not part of a masked-LM model
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"], info
    t = ours.cls.predictions.transform
    _assert_transformers_init(t.dense.weight, t.dense.bias, 0.11, "transform.dense")
    assert torch.equal(t.LayerNorm.weight, torch.ones_like(t.LayerNorm.weight))
    assert torch.equal(t.LayerNorm.bias, torch.zeros_like(t.LayerNorm.bias))
    assert torch.equal(ours.cls.predictions.bias, torch.zeros_like(ours.cls.predictions.bias))
    # the decoder is tied to the checkpoint's word embeddings, not initialised
    assert torch.equal(ours.cls.predictions.decoder.weight, ref.embeddings.word_embeddings.weight)


def test_checkpoint_without_pooler_initialises_it(tmp_path):
    """Masked-LM checkpoints carry no pooler: a model that has one initialises it and reports it
    (transformers does the same), instead of raising."""
    _hf_checkpoint(tmp_path, "seq", hidden_size=64, num_attention_heads=4, initializer_range=0.09)
    _rewrite_safetensors(tmp_path, lambda sd: {k: v for k, v in sd.items() if not k.startswith("bert.pooler.")})
    ours, info = flm.BertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"], info
    _assert_transformers_init(ours.bert.pooler.dense.weight, ours.bert.pooler.dense.bias, 0.09, "pooler")


def test_ignore_mismatched_sizes_for_another_num_labels(tmp_path):
    ref = _hf_checkpoint(tmp_path, "seq", initializer_range=0.25, hidden_size=60, num_attention_heads=3)
    with pytest.raises(CheckpointError) as e:
        flm.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    msg = str(e.value)
    assert "classifier.weight" in msg and "classifier.bias" in msg and "(3, 60)" in msg and "(5, 60)" in msg, msg
    assert "ignore_mismatched_sizes" in msg
    ours, info = flm.BertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    assert sorted(info["mismatched_keys"]) == ["classifier.bias", "classifier.weight"], info
    assert ours.classifier.weight.shape == (5, 60) and ours.config.num_labels == 5
    _assert_transformers_init(ours.classifier.weight, ours.classifier.bias, 0.25, "re-initialised classifier")
    for k, v in ref.bert.state_dict().items():
        assert torch.equal(ours.bert.state_dict()[k], v), k


# ------------------------------------------------------------------------------- errors
def test_missing_body_key(tmp_path):
    _hf_checkpoint(tmp_path)
    _rewrite_safetensors(tmp_path, lambda sd: {k: v for k, v in sd.items()
                                               if k != "encoder.layer.1.attention.self.key.weight"})
    with pytest.raises(CheckpointError, match=r"missing 1: \['encoder\.layer\.1\.attention\.self\.key\.weight'\]"):
        flm.BertModel.from_pretrained(tmp_path)
    # missing from a head model's checkpoint too (prefixed names)
    _hf_checkpoint(tmp_path / "mlm", "masked-lm")
    _rewrite_safetensors(tmp_path / "mlm", lambda sd: {k: v for k, v in sd.items()
                                                       if k != "bert.embeddings.LayerNorm.bias"})
    with pytest.raises(CheckpointError, match=r"bert\.embeddings\.LayerNorm\.bias"):
        flm.BertForMaskedLM.from_pretrained(tmp_path / "mlm")


def test_unexpected_body_key(tmp_path):
    ref = _hf_checkpoint(tmp_path)   # two layers: a third layer's tensor does not belong
    _rewrite_safetensors(tmp_path, lambda sd: {**sd, "encoder.layer.2.output.dense.bias": torch.ones(24)})
    with pytest.raises(CheckpointError, match=r"unexpected 1: \['encoder\.layer\.2\.output\.dense\.bias'\]"):
        flm.BertModel.from_pretrained(tmp_path)
    assert ref.config.num_hidden_layers == 2


def test_every_problem_in_one_error(tmp_path):
    _hf_checkpoint(tmp_path, "seq")

    def damage(sd):
        sd = dict(sd)
        del sd["bert.encoder.layer.0.output.dense.weight"]
        del sd["bert.embeddings.token_type_embeddings.weight"]
        sd["bert.encoder.layer.0.attention.self.query.weight"] = torch.randn(24, 23)
        sd["bert.embeddings.position_embeddings.weight"] = torch.randn(21, 24)
        sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.randn(3)
        return sd
    _rewrite_safetensors(tmp_path, damage)
    with pytest.raises(CheckpointError) as e:
        flm.BertForSequenceClassification.from_pretrained(tmp_path)
    msg = str(e.value)
    for needle in ("bert.encoder.layer.0.output.dense.weight", "bert.embeddings.token_type_embeddings.weight",
                   "bert.encoder.layer.0.attention.self.query.weight: checkpoint (24, 23), model (24, 24)",
                   "bert.embeddings.position_embeddings.weight: checkpoint (21, 24), model (20, 24)",
                   "bert.encoder.layer.0.attention.self.rotary.weight", str(tmp_path)):
        assert needle in msg, f"{needle!r} not in the error: {msg}"


def test_load_state_dict_strict_lists_problems():
    cfg = flm.BertConfig.from_dict(hf_config().to_dict())
    model = flm.BertModel(cfg)
    sd = model.state_dict()
    del sd["encoder.layer.0.attention.self.value.bias"]
    sd["bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        model.load_state_dict(sd)
    assert "encoder.layer.0.attention.self.value.bias" in str(e.value) and "bogus.weight" in str(e.value)
    res = model.load_state_dict(sd, strict=False)
    assert "encoder.layer.0.attention.self.value.bias" in res.missing_keys and "bogus.weight" in res.unexpected_keys


def test_unknown_model_type_lists_supported(tmp_path):
    _hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for call in (flm.AutoModel.from_pretrained, flm.AutoConfig.from_pretrained,
                 flm.AutoModelForSequenceClassification.from_pretrained):
        with pytest.raises(ValueError, match=r"model_type.*\[[^]]*'bert'[^]]*\].*'gpt_neox'"):
            call(tmp_path)
    with pytest.raises(ConfigError, match="model_type.*'gpt_neox'"):
        flm.BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [("hidden_act", "silu"), ("hidden_act", "quick_gelu"),
                                          ("position_embedding_type", "relative_key"), ("is_decoder", True),
                                          ("add_cross_attention", True)])
def test_unsupported_config_value_names_the_field(tmp_path, field, value):
    _hf_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for call in (flm.BertModel.from_pretrained, flm.AutoModel.from_pretrained, flm.AutoConfig.from_pretrained):
        with pytest.raises(ConfigError) as e:
            call(tmp_path)
        assert str(e.value).startswith(field + ":") and repr(value) in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=field):
        flm.BertConfig(**{field: value})


@pytest.mark.parametrize("bad", [dict(hidden_size=25, num_attention_heads=3), dict(num_hidden_layers=0),
                                 dict(layer_norm_eps=0.0), dict(hidden_dropout_prob=1.5),
                                 dict(problem_type="ranking")])
def test_invalid_config_values(bad):
    field = "hidden_size" if "hidden_size" in bad else next(iter(bad))
    with pytest.raises(ConfigError, match=f"^{field}:"):
        flm.BertConfig(**bad)


def test_not_a_directory(tmp_path):
    for name in ("bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", str(tmp_path / "nope")):
        for call in (flm.BertModel.from_pretrained, flm.AutoModel.from_pretrained, flm.resolve_model_dir,
                     flm.AutoConfig.from_pretrained):
            with pytest.raises(ValueError, match="not a directory") as e:
                call(name)
            assert repr(name) in str(e.value) and "download" in str(e.value)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        flm.BertModel.from_pretrained(f)


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        flm.BertModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        flm.AutoModel.from_pretrained(tmp_path)
    hf_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no weights.*model\.safetensors.*pytorch_model\.bin"):
        flm.BertModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        flm.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        flm.BertConfig.from_pretrained(tmp_path)


def test_bad_forward_arguments(tmp_path):
    _hf_checkpoint(tmp_path)
    model = flm.BertModel.from_pretrained(tmp_path)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with pytest.raises(ValueError, match="input_ids / inputs_embeds.*both"):
        model(ids, inputs_embeds=torch.randn(2, 6, cfg.hidden_size))
    with pytest.raises(ValueError, match="input_ids / inputs_embeds.*neither"):
        model()
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 6\).*\(2, 7\)"):
        model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 6))
    long_ids = torch.randint(0, cfg.vocab_size, (1, cfg.max_position_embeddings + 1))
    with pytest.raises(ValueError, match=f"max_position_embeddings={cfg.max_position_embeddings}"):
        model(long_ids)
    model(long_ids[:, :-1])   # exactly max_position_embeddings is fine
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 6, cfg.hidden_size + 1))
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids: expected 2 dims"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"token_type_ids: expected shape \(2, 6\)"):
        model(ids, token_type_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids: expected shape \(2, 6\)"):
        model(ids, position_ids=torch.arange(5)[None])
    # a (1, L) position_ids broadcasts, as in transformers
    with torch.no_grad():
        a = model(ids, position_ids=torch.arange(6)[None]).last_hidden_state
        b = model(ids).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_head_argument_errors(tmp_path):
    _hf_checkpoint(tmp_path / "qa", "qa", num_labels=3)
    model = flm.BertForQuestionAnswering.from_pretrained(tmp_path / "qa")
    with pytest.raises(ValueError, match="num_labels.*2.*3"):
        model(torch.randint(0, 50, (2, 5)))
    _hf_checkpoint(tmp_path / "mc", "choice")
    model = flm.BertForMultipleChoice.from_pretrained(tmp_path / "mc")
    with pytest.raises(ValueError, match="num_choices"):
        model(torch.randint(0, 50, (2, 5)))


def test_save_and_load_argument_errors(tmp_path):
    _hf_checkpoint(tmp_path)
    model = flm.BertModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safe_serialization"):
        model.save_pretrained(tmp_path / "out", safe_serialization=False)
    with pytest.raises(TypeError, match="config"):
        flm.BertModel.from_pretrained(tmp_path, config=model.config, num_labels=3)
    with pytest.raises(ValueError, match="dtype"):
        flm.BertModel.from_pretrained(tmp_path, dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype"):
        flm.BertModel.from_pretrained(tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "out", max_shard_size="lots")
    with pytest.raises(TypeError, match="config"):
        flm.BertModel(hf_config())   # a transformers config is not ours


def test_dtype_and_device(tmp_path):
    ref = _hf_checkpoint(tmp_path)
    m64 = flm.BertModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters()) and m64.device.type == "cpu"
    inputs = _inputs(ref.config)
    with torch.no_grad():
        assert_rel(m64(**inputs).last_hidden_state.float(), ref(**inputs).last_hidden_state, RTOL, "float64",
                   mask=token_mask(inputs))
    assert flm.BertModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    auto = flm.BertModel.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert auto.dtype == torch.bfloat16
    # the default follows the checkpoint, as transformers 5 does; a dtype given wins
    assert flm.BertModel.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert flm.BertModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32).dtype == torch.float32
    assert flm.BertModel.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="device"):
        flm.BertModel.from_pretrained(tmp_path, device="not-a-device")


# ------------------------------------------------------------------------------- config
def test_config_unknown_keys_survive_a_save(tmp_path):
    ref = _hf_checkpoint(tmp_path / "a", "seq")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["my_custom_key"] = {"nested": [1, 2, 3]}
    cfg["gradient_checkpointing"] = False
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    model = flm.BertForSequenceClassification.from_pretrained(tmp_path / "a")
    assert model.config.my_custom_key == {"nested": [1, 2, 3]}
    with pytest.raises(AttributeError):
        model.config.not_there
    model.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["my_custom_key"] == {"nested": [1, 2, 3]} and saved["gradient_checkpointing"] is False
    assert saved["transformers_version"] == cfg["transformers_version"]
    for k, v in cfg.items():   # nothing of the original is lost or changed
        if k not in ("architectures", "dtype"):
            assert saved.get(k) == v, f"{k}: {saved.get(k)!r} != {v!r}"
    assert saved["architectures"] == ["BertForSequenceClassification"] and saved["dtype"] == "float32"
    back = hf.AutoConfig.from_pretrained(tmp_path / "b")
    assert back.my_custom_key == {"nested": [1, 2, 3]} and back.num_labels == ref.config.num_labels


def test_config_id2label_string_keys(tmp_path):
    labels = {"0": "negative", "1": "neutral", "2": "positive"}
    _hf_checkpoint(tmp_path / "a", "seq", id2label=labels, label2id={v: int(k) for k, v in labels.items()})
    raw = json.loads((tmp_path / "a" / "config.json").read_text())
    assert set(raw["id2label"]) == {"0", "1", "2"}, "transformers writes string keys"
    cfg = flm.AutoConfig.from_pretrained(tmp_path / "a")
    assert cfg.id2label == {0: "negative", 1: "neutral", 2: "positive"} and cfg.num_labels == 3
    assert cfg.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    cfg.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["id2label"] == labels and saved["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    assert hf.AutoConfig.from_pretrained(tmp_path / "b").id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_config_num_labels_override(tmp_path):
    labels = {"0": "no", "1": "yes", "2": "maybe"}
    _hf_checkpoint(tmp_path, "seq", id2label=labels, label2id={v: int(k) for k, v in labels.items()})
    same = flm.BertConfig.from_pretrained(tmp_path, num_labels=3)
    assert same.id2label == {0: "no", 1: "yes", 2: "maybe"}, "an equal num_labels keeps the names"
    five = flm.BertConfig.from_pretrained(tmp_path, num_labels=5)
    assert five.num_labels == 5 and five.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert five.label2id == {f"LABEL_{i}": i for i in range(5)}
    assert flm.BertConfig().num_labels == 2
    other = flm.BertConfig.from_pretrained(tmp_path, hidden_dropout_prob=0.0, classifier_dropout=0.2)
    assert other.hidden_dropout_prob == 0.0 and other.classifier_dropout == 0.2
    with pytest.raises(ConfigError, match="num_labels"):
        flm.BertConfig.from_pretrained(tmp_path, num_labels=0)
    model = flm.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=5,
                                                                   ignore_mismatched_sizes=True)
    assert model.classifier.out_features == 5 and model.config.num_labels == 5


def test_config_matches_transformers_fields(tmp_path):
    _hf_checkpoint(tmp_path, "base", "h36-3x12-gelu_new", classifier_dropout=0.3, pad_token_id=3)
    ours = flm.BertConfig.from_pretrained(tmp_path)
    theirs = hf.BertConfig.from_pretrained(tmp_path)
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
              "classifier_dropout", "initializer_range", "hidden_dropout_prob", "attention_probs_dropout_prob",
              "tie_word_embeddings"):
        assert getattr(ours, f) == getattr(theirs, f), f
    # transformers 4.x wrote torch_dtype; it reads as dtype
    d = {k: v for k, v in theirs.to_dict().items() if k != "dtype"}
    legacy = flm.BertConfig.from_dict({**d, "torch_dtype": "bfloat16"})
    assert legacy.dtype == "bfloat16" and "torch_dtype" not in legacy.to_dict()


# ------------------------------------------------------------------------------- auto
@pytest.mark.parametrize("head", list(HEADS))
def test_auto_classes_pick_the_class(tmp_path, head):
    hf_cls, _, fl_cls, fl_auto, _ = HEADS[head]
    _hf_checkpoint(tmp_path, head)
    assert type(flm.AutoConfig.from_pretrained(tmp_path)) is flm.BertConfig
    model = fl_auto.from_pretrained(tmp_path)
    assert type(model) is fl_cls and not model.training
    assert flm.model_for_architecture(tmp_path) is fl_cls
    assert type(flm.AutoModel.from_pretrained(tmp_path)) is flm.BertModel   # the body of any head
    assert fl_auto.model_class(flm.BertConfig()) is fl_cls
    assert type(fl_auto.from_config(flm.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=10))) is fl_cls


def test_auto_without_model_type_or_architectures(tmp_path):
    _hf_checkpoint(tmp_path, "token")
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert type(flm.AutoModelForTokenClassification.from_pretrained(tmp_path)) is flm.BertForTokenClassification
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"no model_type.*\[[^]]*'bert'[^]]*\]"):
        flm.AutoModel.from_pretrained(tmp_path)
    cfg["model_type"] = "bert"
    del cfg["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert flm.model_for_architecture(tmp_path) is flm.BertModel
    assert "bert" in flm.supported_model_types()
