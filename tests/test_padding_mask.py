"""models.layers.padding_mask: a transformers attention_mask becomes fl.attention's key_padding_mask,
or None when every position is a token (the kernels' unmasked path), in BERT, GPT-2 and BART."""
import pytest
import torch
import transformers as hf

import fastlayers as fl
from fastlayers.models import BartModel, BertModel, GPT2Model
from fastlayers.models.layers import padding_mask


def test_padding_mask_rules():
    assert padding_mask(None, 2, 3) is None
    assert padding_mask(torch.ones(2, 3, dtype=torch.long), 2, 3) is None
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    got = padding_mask(m, 2, 3)
    assert got.dtype == torch.bool and torch.equal(got, m.bool())
    with pytest.raises(ValueError, match=r"decoder_attention_mask: expected a \(B, L\) = \(2, 3\) padding mask .* "
                                         r"got shape \(2, 1, 3\) \(3-D/4-D masks are not supported\)"):
        padding_mask(m[:, None], 2, 3, "decoder_attention_mask")
    with pytest.raises(ValueError, match=r"attention_mask: expected a \(B, L\) = \(2, 4\)"):
        padding_mask(m, 2, 4)
    # traced: no host read, the mask is kept as it is (fullgraph: no graph break)
    f = torch.compile(lambda t: padding_mask(t, 2, 3), fullgraph=True, backend="eager")
    assert torch.equal(f(torch.ones(2, 3, dtype=torch.long)), torch.ones(2, 3, dtype=torch.bool))


def _models(tmp_path):
    torch.manual_seed(0)
    bert = hf.BertModel(hf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32), add_pooling_layer=False)
    gpt2 = hf.GPT2Model(hf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    bart = hf.BartModel(hf.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                      decoder_ffn_dim=32, max_position_embeddings=32))
    out = {}
    for name, m, cls in (("bert", bert, BertModel), ("gpt2", gpt2, GPT2Model), ("bart", bart, BartModel)):
        m.save_pretrained(tmp_path / name)
        out[name] = (m.eval(), cls.from_pretrained(tmp_path / name).eval())
    return out


def test_models_pass_no_mask_for_an_unpadded_batch(tmp_path, monkeypatch):
    """An all-ones mask reaches fl.attention as None (same outputs as no mask, and as transformers);
    a padded one as the (B, L) bool mask."""
    masks = []
    real = fl.attention

    def spy(*args, **kw):
        masks.append(kw.get("key_padding_mask"))
        return real(*args, **kw)
    monkeypatch.setattr(fl, "attention", spy)
    ids = torch.randint(3, 50, (2, 7))
    for name, (theirs, ours) in _models(tmp_path).items():
        extra = {"decoder_input_ids": ids[:, :5]} if name == "bart" else {}
        for mask in (torch.ones_like(ids), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])):
            if name == "bart":   # BART pads on the right
                mask = mask.flip(1)
            masks.clear()
            with torch.no_grad():
                got = ours(ids, attention_mask=mask, **extra).last_hidden_state
                want = theirs(ids, attention_mask=mask, **extra).last_hidden_state
            assert masks, name
            if bool(mask.all()):
                assert all(m is None for m in masks), name
                with torch.no_grad():
                    torch.testing.assert_close(ours(ids, **extra).last_hidden_state, got, rtol=0, atol=0)
            else:
                assert any(m is not None and torch.equal(m, mask.bool()) for m in masks), name
            rows = mask.bool() if name != "bart" else torch.ones_like(mask, dtype=torch.bool)[:, :5]
            torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-5)
