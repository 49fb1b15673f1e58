"""Generation (fastlayers.models.generation on GPT-2) against Hugging Face transformers' `generate`.

One tiny perturbed GPT-2 (initializer_range 0.5, so greedy continuations vary instead of repeating
one token), saved by transformers and loaded by both libraries. transformers' ids are checked to be
well-conditioned (gpt2_helpers.hf_generate: no near-tie between the two best tokens at any step),
so the two implementations, within 1e-5 of each other, must agree on every id:
  - greedy ids EXACTLY equal to transformers' for one prompt, a left-padded batch of prompts of
    different lengths, eos hit early (rows finishing at different steps, padded with pad_token_id,
    the same output length), eos as a list, min_new_tokens / min_length, repetition_penalty below
    and above 1, no_repeat_ngram_size 1/2/3, max_length, the folder's generation_config.json;
  - sampling: the same ids under one torch.manual_seed; top_k / top_p / temperature filtering
    (generation.top_k_filter / top_p_filter + sample_from_scores) against a float64 reference of
    the filtered distribution, with a bound that a wrong filter (one token more or less) fails;
  - streamers (transformers' TextStreamer protocol, and a callable); the errors generate raises;
  - the Triton backend (interpreter on CPU); a byte-level BPE tokenizer trained in the test, text in
    and text out.
GPU tests (marker gpu): CUDA-graph decode gives the eager ids for batch 1 and 8 on both kernel
backends, and a captured session serves the next prompt.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as hf

import fastlayers as fl
from fastlayers import models as flm
from fastlayers.models import generation as gen
from gpt2_helpers import PAD, checkpoint, finished_steps, hf_config, hf_generate, left_padded
from model_helpers import gpu_backend_or_skip

GEN_CONFIG = dict(vocab_size=97, n_embd=32, n_head=4, n_layer=2, n_positions=40, n_inner=None,
                  initializer_range=0.5)
V = GEN_CONFIG["vocab_size"]
LENGTHS = [7, 4, 1]          # the left-padded batch: a full row, a half row, a one-token row


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, fastlayers model, folder): one checkpoint for the module, drawn from its
    own seed so that it does not depend on which tests ran before."""
    d = tmp_path_factory.mktemp("gpt2-gen")
    with torch.random.fork_rng():
        torch.manual_seed(20240611)
        ref = checkpoint(d, hf.GPT2LMHeadModel, hf_config(**GEN_CONFIG))
    return ref, flm.GPT2LMHeadModel.from_pretrained(d), d


def _batch():
    return left_padded(LENGTHS, V)


def _same(ours, ref, ids, mask=None, **kw):
    """Our greedy ids vs transformers' (well-conditioned); returns ours."""
    want = hf_generate(ref, ids, mask, **kw)
    got = ours.generate(ids, attention_mask=mask, **kw)
    assert got.dtype == torch.long
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != transformers' {tuple(want.shape)}"
    assert torch.equal(got, want), f"ids differ from transformers':\nours   {got.tolist()}\ntheirs {want.tolist()}"
    return got


def _pick(new: torch.Tensor, row: int, steps, avoid=()) -> int:
    """A token row `row` emits at one of `steps` (the first that is neither PAD nor in `avoid`)."""
    for t in steps:
        tok = int(new[row, t])
        if tok != PAD and tok not in avoid:
            return tok
    raise AssertionError(f"test setup: no usable token in row {row} at steps {steps}: {new[row].tolist()}")


# ------------------------------------------------------------------------------------ greedy
def test_greedy_single_prompt(pair):
    ref, ours, _ = pair
    ids = torch.randint(1, V, (1, 6))
    got = _same(ours, ref, ids, max_new_tokens=15)
    assert got.shape == (1, 21) and torch.equal(got[:, :6], ids)
    assert len(set(got[0, 6:].tolist())) > 3, "the model repeats one token: the test would prove little"
    _same(ours, ref, ids, torch.ones_like(ids), max_new_tokens=15)          # explicit all-ones mask


def test_greedy_left_padded_batch(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    got = _same(ours, ref, ids, mask, max_new_tokens=12, pad_token_id=PAD)
    P = ids.shape[1]
    # each row alone (no padding) gives the same continuation: the padding is invisible
    for b, n in enumerate(LENGTHS):
        alone = ours.generate(ids[b:b + 1, P - n:], max_new_tokens=12, pad_token_id=PAD)
        assert torch.equal(alone[0, n:], got[b, P:]), f"row {b}: padded batch and alone differ"
    # the mask inferred from pad_token_id (as transformers does) gives the same ids
    assert torch.equal(ours.generate(ids, max_new_tokens=12, pad_token_id=PAD), got)


@pytest.mark.parametrize("sync_every", [1, 3, 16])
def test_eos_hit_early(pair, sync_every):
    """eos chosen from row 0's greedy tokens at step ~3: rows finish at different steps (or never),
    finished rows continue with pad_token_id, and the output has transformers' length."""
    ref, ours, _ = pair
    ids, mask = _batch()
    P, N = ids.shape[1], 12
    plain = hf_generate(ref, ids, mask, max_new_tokens=N, pad_token_id=PAD)[:, P:]
    for t in (2, 3, 1, 4, 5):
        eos = _pick(plain, 0, [t])
        fin = finished_steps(plain, eos)
        if fin[0] is not None and fin[0] >= 1 and len(set(fin)) > 1:
            break
    else:
        raise AssertionError(f"test setup: no eos candidate makes rows finish apart: {plain.tolist()}")
    got = _same(ours, ref, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    again = ours.generate(ids, attention_mask=mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD,
                          sync_every=sync_every)
    assert torch.equal(again, got), f"sync_every={sync_every} changed the ids"
    new = got[:, P:]
    length = N if None in fin else max(fin) + 1
    assert new.shape[1] == length
    for b, f in enumerate(fin):
        if f is not None:
            assert new[b, f] == eos and (new[b, f + 1:] == PAD).all(), f"row {b}: not padded after eos"
            assert torch.equal(new[b, :f], plain[b, :f])
        else:
            assert torch.equal(new[b], plain[b, :length])


def test_eos_as_a_list_all_rows_finish_early(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    P, N = ids.shape[1], 12
    plain = hf_generate(ref, ids, mask, max_new_tokens=N, pad_token_id=PAD)[:, P:]
    eos = []
    for b, steps in enumerate(([2, 3, 1], [4, 3, 5, 2, 1], [1, 2, 3, 0])):
        f = finished_steps(plain[b:b + 1], eos)[0] if eos else None
        if f is None or f >= N - 1:             # row b does not stop yet: one of its tokens joins the list
            eos.append(_pick(plain, b, steps, avoid=eos))
    fin = finished_steps(plain, eos)
    assert all(f is not None for f in fin) and max(fin) < N - 1
    if len(eos) == 1:
        eos.append(next(t for t in range(1, V) if t not in plain))   # a list all the same
    got = _same(ours, ref, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    assert got.shape[1] == P + max(fin) + 1, "generation must stop once every row is finished"
    # without pad_token_id, finished rows are padded with the first eos id (transformers' rule)
    got2 = _same(ours, ref, ids, mask, max_new_tokens=N, eos_token_id=eos)
    for b, f in enumerate(fin):
        assert (got2[b, P + f + 1:] == eos[0]).all()


def test_min_new_tokens_and_min_length(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    P, N = ids.shape[1], 10
    plain = hf_generate(ref, ids, mask, max_new_tokens=N, pad_token_id=PAD)[:, P:]
    eos = _pick(plain, 0, [0, 1])            # row 0 would stop at once
    early = _same(ours, ref, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD)
    for kw, m in ((dict(min_new_tokens=4), 4), (dict(min_length=P + 3), 3),
                  (dict(min_new_tokens=2, min_length=P + 5), 5)):
        got = _same(ours, ref, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=PAD, **kw)
        assert not (got[:, P:P + m] == eos).any(), f"{kw}: eos within the first {m} new tokens"
        assert not torch.equal(got[:, :early.shape[1]], early), f"{kw} had no effect"


@pytest.mark.parametrize("penalty", [0.7, 1.5])
def test_repetition_penalty(pair, penalty):
    ref, ours, _ = pair
    ids, mask = _batch()
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=PAD)
    got = _same(ours, ref, ids, mask, max_new_tokens=12, pad_token_id=PAD, repetition_penalty=penalty)
    assert not torch.equal(got, plain), f"repetition_penalty={penalty} had no effect"


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size(pair, n):
    ref, ours, _ = pair
    ids, mask = _batch()
    P = ids.shape[1]
    N = 14 if n > 1 else 8
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=N, pad_token_id=PAD)
    got = _same(ours, ref, ids, mask, max_new_tokens=N, pad_token_id=PAD, no_repeat_ngram_size=n)
    assert not torch.equal(got, plain), f"no_repeat_ngram_size={n} had no effect"
    row = got[0].tolist()                                             # row 0: no padding
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    assert len(grams) == len(set(grams)), f"a repeated {n}-gram in {row}"
    assert got.shape[1] == P + N


def test_max_length_instead_of_max_new_tokens(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    P = ids.shape[1]
    got = _same(ours, ref, ids, mask, max_length=P + 5, pad_token_id=PAD)
    assert got.shape == (3, P + 5)
    # max_new_tokens wins over max_length, as in transformers
    got = _same(ours, ref, ids, mask, max_length=P + 5, max_new_tokens=3, pad_token_id=PAD)
    assert got.shape == (3, P + 3)


def test_generation_config_json_defaults(pair, tmp_path):
    ref, ours, d = pair
    ids, mask = _batch()
    P = ids.shape[1]
    plain = hf_generate(ref, ids, mask, max_new_tokens=8, pad_token_id=PAD)[:, P:]
    eos = _pick(plain, 1, [2, 3, 4])
    folder = tmp_path / "with-defaults"
    shutil.copytree(d, folder)
    defaults = dict(max_new_tokens=8, repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=eos,
                    pad_token_id=PAD, min_new_tokens=1)
    (folder / "generation_config.json").write_text(json.dumps(defaults))
    ref2 = hf.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours2 = flm.GPT2LMHeadModel.from_pretrained(folder)
    assert ref2.generation_config.no_repeat_ngram_size == 2, "transformers did not read the file"
    got = _same(ours2, ref2, ids, mask)                                   # every setting from the file
    assert got.shape[1] <= P + 8
    assert not torch.equal(got, _same(ours, ref, ids, mask, max_new_tokens=8, pad_token_id=PAD)[:, :got.shape[1]])
    got = _same(ours2, ref2, ids, mask, max_new_tokens=3)                 # a kwarg overrides the file
    assert got.shape[1] <= P + 3


def test_generation_config_json_nulls_mean_defaults(pair, tmp_path):
    """transformers 5 keeps unset fields None and writes them as null (to_json_file(use_diff=False)):
    a null is the default, for the file and for a generate() kwarg."""
    ref, ours, d = pair
    ids, mask = _batch()
    folder = tmp_path / "nulls"
    shutil.copytree(d, folder)
    full = hf.GenerationConfig(max_new_tokens=6, repetition_penalty=1.3, pad_token_id=PAD)
    full.to_json_file(folder / "generation_config.json", use_diff=False)
    assert json.loads((folder / "generation_config.json").read_text())["top_k"] is None
    ours2 = flm.GPT2LMHeadModel.from_pretrained(folder)
    gc = ours2.generation_config
    assert (gc.top_k, gc.max_length, gc.do_sample, gc.num_beams, gc.top_p) == (50, None, False, 1, 1.0)
    want = ours.generate(ids, attention_mask=mask, max_new_tokens=6, repetition_penalty=1.3, pad_token_id=PAD)
    assert torch.equal(ours2.generate(ids, attention_mask=mask), want)
    assert torch.equal(ours2.generate(ids, attention_mask=mask, top_k=None, do_sample=None), want)


# ------------------------------------------------------------------------------------ sampling
def test_sampling_reproducible_under_manual_seed(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    kw = dict(do_sample=True, max_new_tokens=10, top_k=20, top_p=0.9, temperature=1.3, pad_token_id=PAD)
    torch.manual_seed(7)
    a = ours.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    b = ours.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(8)
    c = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(a, b), "the same seed gave different ids"
    assert not torch.equal(a, c), "another seed gave the same ids: is anything sampled?"
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    assert not torch.equal(a, greedy)
    # top_k=1 leaves one token: sampling is greedy decoding (transformers' too)
    one = ours.generate(ids, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=10, pad_token_id=PAD)
    assert torch.equal(one, greedy)
    assert torch.equal(one, ref.generate(ids, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=10,
                                         pad_token_id=PAD))


def test_num_return_sequences_with_sampling(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    P = ids.shape[1]
    got = ours.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=4, max_new_tokens=6,
                        pad_token_id=PAD, temperature=1.5)
    want = ref.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=4, max_new_tokens=6,
                        pad_token_id=PAD, temperature=1.5)
    assert got.shape == want.shape == (12, P + 6)
    assert torch.equal(got[:, :P], ids.repeat_interleave(4, 0)), "each prompt's copies must be adjacent"
    for b in range(3):
        assert len({tuple(r) for r in got[4 * b:4 * b + 4, P:].tolist()}) > 1, f"prompt {b}: copies all equal"


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=10), dict(temperature=1.4, top_p=0.8),
                                dict(top_k=6, top_p=0.7, repetition_penalty=1.3, no_repeat_ngram_size=2)])
def test_sampling_scores_match_transformers(pair, kw):
    """The processed scores of the first sampled step (temperature, top-k, top-p after the penalties)
    equal transformers' (same finite entries within 1e-5, same -inf pattern), and generate's draws
    follow softmax of them: 20000 rows of one prompt, frequencies against the float64 reference."""
    ref, ours, _ = pair
    ids = torch.randint(1, V, (2, 5))
    ids[:, 3] = ids[:, 1]                                     # a repeated token for the penalties
    kw = dict(kw, do_sample=True, max_new_tokens=1, pad_token_id=PAD, output_scores=True,
              return_dict_in_generate=True)
    want = ref.generate(ids, **kw).scores[0]
    got = ours.generate(ids, **kw).scores[0]
    assert got.shape == want.shape == (2, V)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "a different set of tokens survives the filters"
    assert 1 < int(fin[0].sum()) < V
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)
    N = 20_000
    kw.update(output_scores=False, return_dict_in_generate=False)
    new = ours.generate(ids[:1].expand(N, -1).contiguous(), **kw)[:, -1]
    freq = torch.bincount(new, minlength=V).double() / N
    p = torch.softmax(want[0].double(), -1)
    bound = 5 * torch.sqrt(p * (1 - p) / N) + 1e-4
    assert (freq[~fin[0]] == 0).all() and ((freq - p).abs() <= bound).all(), f"{freq.tolist()}\n{p.tolist()}"


LOGITS = torch.tensor([2.0, 1.6, 1.3, 1.0, 0.6, 0.3, 0.0, -0.4, -0.9, -1.5, -2.2, -3.0], dtype=torch.float64)
DRAWS = 300_000


def _filtered_f64(logits, temperature, top_k, top_p, extra_p=0):
    """The float64 reference, written independently of transformers' formulas: softmax(logits / T)
    restricted to the top_k most likely tokens, then to the smallest set of most likely tokens
    whose probability reaches top_p, renormalised. extra_p: keep that many tokens more after top_p
    (the off-by-one filters the test must reject)."""
    p = torch.softmax(logits / temperature, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[: top_k if top_k else len(p)]] = True
    p = torch.where(keep, p, 0)
    p = p / p.sum()
    if top_p < 1:
        sorted_p = p[order]
        before = torch.cumsum(sorted_p, 0) - sorted_p                     # mass of the more likely tokens
        assert ((before - top_p).abs() > 0.01).all(), "test setup: a token sits on the top_p boundary"
        n = int((before < top_p).sum()) + extra_p
        keep = torch.zeros_like(keep)
        keep[order[:n]] = True
        p = torch.where(keep, p, 0)
        p = p / p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (1.0, 7, 0.6), (2.0, 0, 0.45), (0.5, 3, 0.9)])
def test_filtered_sampling_distribution(temperature, top_k, top_p):
    scores = (LOGITS.float() / temperature).expand(DRAWS, -1).contiguous()
    if top_k:
        scores = gen.top_k_filter(scores, top_k)
    if top_p < 1:
        scores = gen.top_p_filter(scores, top_p)
    tok = gen.sample_from_scores(scores)
    assert tok.shape == (DRAWS,) and tok.dtype == torch.long
    freq = torch.bincount(tok, minlength=len(LOGITS)).double() / DRAWS
    ref = _filtered_f64(LOGITS, temperature, top_k, top_p)
    assert (freq[ref == 0] == 0).all(), f"a filtered-out token was drawn: {freq.tolist()} vs {ref.tolist()}"
    # 5 standard deviations of a frequency of DRAWS draws (<= 0.0046): a filter keeping one token
    # more or less moves some frequency by > 0.02
    bound = 5 * torch.sqrt(ref * (1 - ref) / DRAWS) + 1e-4
    assert ((freq - ref).abs() <= bound).all(), f"freq {freq.tolist()}\nref  {ref.tolist()}"
    # the bound's power: every wrong filter that changes the distribution (one token more or less
    # kept, the temperature forgotten) is rejected by this sample
    wrongs = [dict(top_k=top_k + 1), dict(top_k=top_k - 1)] if top_k else []
    wrongs += [dict(extra_p=1), dict(extra_p=-1)] if top_p < 1 else []
    wrongs += [dict(temperature=1.0)] if temperature != 1.0 else []
    tested = 0
    for wrong in wrongs:
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        kw.update(wrong)
        bad = _filtered_f64(LOGITS, **kw)
        if (bad - ref).abs().max() > 0.01:
            tested += 1
            assert ((freq - bad).abs() > bound).any(), f"the bound does not reject a wrong filter {wrong}"
    assert tested or not wrongs, "no wrong filter differs: the case proves nothing about the filters"


def test_sample_from_scores_edge_rows():
    inf = float("-inf")
    scores = torch.tensor([[inf, 3.0, inf, inf], [1e4, 1e4 - 50, inf, inf], [0.0, 0.0, 0.0, 0.0]])
    tok = gen.sample_from_scores(scores.repeat(2000, 1)).view(2000, 3)
    assert (tok[:, 0] == 1).all() and (tok[:, 1] == 0).all()
    assert set(tok[:, 2].tolist()) == {0, 1, 2, 3}
    # top_k ties at the k-th score are kept (transformers' rule); top_p always keeps the best token
    kept = gen.top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]]), 2)
    assert torch.isfinite(kept).tolist() == [[False, True, True, True, False]]
    kept = gen.top_p_filter(torch.tensor([[0.0, 9.0, 1.0]]), 0.01)
    assert torch.isfinite(kept).tolist() == [[False, True, False]]


# ------------------------------------------------------------------------------------ streamers
class _Recorder:
    """transformers' BaseStreamer protocol: put(tensor) per step, end() once."""

    def __init__(self):
        self.calls, self.ended = [], 0

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.ended += 1


class _WordTokenizer:
    """What TextStreamer needs of a tokenizer: decode(ids) -> text (one word per id)."""

    def decode(self, ids, **kw):
        ids = [ids] if isinstance(ids, int) else list(ids)
        return "".join(f"w{i} " for i in ids)


def test_streamer_receives_prompt_then_one_token_per_step(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    P = ids.shape[1]
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)[:, P:]
    eos = _pick(plain, 2, [2, 3])
    kw = dict(max_new_tokens=8, pad_token_id=PAD, eos_token_id=eos)
    rec, rec_ref = _Recorder(), _Recorder()
    got = ours.generate(ids, attention_mask=mask, streamer=rec, **kw)
    ref.generate(ids, attention_mask=mask, streamer=rec_ref, do_sample=False, **kw)
    assert rec.ended == rec_ref.ended == 1
    assert len(rec.calls) == len(rec_ref.calls) == 1 + got.shape[1] - P
    assert torch.equal(rec.calls[0], ids), "the first put is the prompt"
    for i, (a, b) in enumerate(zip(rec.calls, rec_ref.calls)):
        assert a.shape == b.shape and torch.equal(a, b), f"put #{i}: {a.tolist()} != transformers' {b.tolist()}"
        assert a.device.type == "cpu"
    assert torch.equal(torch.stack(rec.calls[1:], 1), got[:, P:])


def test_text_streamer_prints_what_transformers_prints(pair, capsys):
    ref, ours, _ = pair
    ids = torch.randint(1, V, (1, 5))
    for skip_prompt in (False, True):
        ours.generate(ids, max_new_tokens=7, streamer=hf.TextStreamer(_WordTokenizer(), skip_prompt=skip_prompt))
        printed = capsys.readouterr().out
        ref.generate(ids, max_new_tokens=7, do_sample=False,
                     streamer=hf.TextStreamer(_WordTokenizer(), skip_prompt=skip_prompt))
        assert printed == capsys.readouterr().out
        assert printed.count("w") == 7 + (0 if skip_prompt else 5)


def test_callable_streamer(pair):
    _, ours, _ = pair
    ids, mask = _batch()
    seen = []
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD, streamer=seen.append)
    assert torch.equal(seen[0], ids) and len(seen) == 6
    assert all(t.shape == (3,) for t in seen[1:])
    assert torch.equal(torch.stack(seen[1:], 1), got[:, ids.shape[1]:])


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_argument(pair):
    ref, ours, _ = pair
    ids, mask = _batch()
    right = mask.flip(1)                                                  # right padding
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids.flip(1), attention_mask=right, max_new_tokens=2)
    hole = torch.ones_like(mask)
    hole[0, 2] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids, attention_mask=hole, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids, attention_mask=mask[:, 1:], max_new_tokens=2)
    P, n_pos = ids.shape[1], GEN_CONFIG["n_positions"]
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=n_pos - P + 2)
    # the last new token is never fed back: P + max_new_tokens - 1 positions are enough
    one = ids[:1, -3:]
    _same(ours, ref, one, max_new_tokens=n_pos - 3 + 1)
    with pytest.raises(ValueError, match="max_length"):
        ours.generate(ids, attention_mask=mask, max_length=P)
    for kw, name in ((dict(max_new_tokens=0), "max_new_tokens"),
                     (dict(do_sample=True, top_p=0.0), "top_p"), (dict(do_sample=True, top_p=1.5), "top_p"),
                     (dict(do_sample=True, temperature=0.0), "temperature"),
                     (dict(do_sample=True, temperature=-1.0), "temperature"),
                     (dict(num_return_sequences=2), "num_return_sequences"),
                     (dict(repetition_penalty=0.0), "repetition_penalty"),
                     (dict(use_cuda_graph=True), "use_cuda_graph")):
        with pytest.raises(ValueError, match=name):
            ours.generate(ids, attention_mask=mask, **{"max_new_tokens": 2, **kw})
    with pytest.raises(TypeError, match="frobnicate"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, frobnicate=True)
    with pytest.raises(ValueError, match="input_ids"):
        ours.generate(ids.int(), attention_mask=mask, max_new_tokens=2)


# ------------------------------------------------------------------------------------ backends
def test_triton_backend_generate(tmp_path):
    """A tiny config through the Triton kernels (interpreter on CPU): prefill through fl.attention,
    decode through fl.attention_with_kvcache with cache_leftpad, ids equal to transformers'."""
    info = fl.available_backends()["triton"]
    if not info["available"]:
        pytest.skip(f"triton backend not available here: {info['reason']}")
    # head_dim 8: the Triton attention takes multiples of 8 (an explicit backend never falls back)
    ref = checkpoint(tmp_path, hf.GPT2LMHeadModel, hf_config(**{**GEN_CONFIG, "n_embd": 16, "n_head": 2,
                                                                 "n_layer": 1, "n_positions": 12}))
    ours = flm.GPT2LMHeadModel.from_pretrained(tmp_path)
    ids, mask = left_padded([4, 2], V)
    want = hf_generate(ref, ids, mask, max_new_tokens=3, pad_token_id=PAD)
    with fl.use_backend("triton"):
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
        for op in ("linear", "layer_norm", "attention", "attention_with_kvcache"):
            assert fl.last_backend(op) == "triton", f"{op} ran on {fl.last_backend(op)!r}"
    assert torch.equal(got, want), f"{got.tolist()} != transformers' {want.tolist()}"


# ------------------------------------------------------------------------------------ tokenizer
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A café in the old town serves naïve tourists crème brûlée.",
    "Fast kernels make small models generate text quickly.",
    "The dog sleeps; the fox runs away into the forest.",
    "Numbers like 42 and 1024 appear in code and in prose.",
]


def test_byte_level_bpe_text_in_text_out(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<pad>")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "pad_token": "<pad>", "padding_side": "left"}))
    cfg = hf_config(**{**GEN_CONFIG, "vocab_size": tok.get_vocab_size()}, bos_token_id=eos, eos_token_id=eos,
                    pad_token_id=pad)
    ref = checkpoint(tmp_path, hf.GPT2LMHeadModel, cfg)
    ours = flm.GPT2LMHeadModel.from_pretrained(tmp_path)
    prompts = ["The quick brown fox", "A café", "Fast kernels make small"]
    try:
        from fastlayers.models.tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        ft = load_tokenizer(tmp_path)
        enc = ft(prompts)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        decode = ft.decode
    else:   # the tokenizers library directly, left-padded by hand
        rows = [tok.encode(p).ids for p in prompts]
        P = max(map(len, rows))
        ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
        decode = tok.decode
    assert ids.dtype == torch.long and (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any(), "not left-padded"
    P = ids.shape[1]
    for b, text in enumerate(prompts):                                    # byte-level BPE is lossless
        assert decode(ids[b][mask[b].bool()].tolist()) == text
        assert ids[b][mask[b].bool()].tolist() == tok.encode(text).ids
    out = _same(ours, ref, ids, mask, max_new_tokens=8)
    texts = [decode(out[b, P:].tolist(), skip_special_tokens=True) for b in range(len(prompts))]
    assert texts == [tok.decode(out[b, P:].tolist(), skip_special_tokens=True) for b in range(len(prompts))]
    assert all(isinstance(t, str) for t in texts) and any(texts)


# ------------------------------------------------------------------------------------ GPU
# head_dim 32: a head dim both kernel backends compile (CUDA: 32/64/96/128; Triton: multiples of 8)
GPU_CONFIG = {**GEN_CONFIG, "vocab_size": 512, "n_embd": 128, "n_head": 4, "n_positions": 256,
              "initializer_range": 0.1}


@pytest.fixture(scope="module")
def gpu_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2-gpu")
    with torch.random.fork_rng():
        torch.manual_seed(99)
        ref = checkpoint(d, hf.GPT2LMHeadModel, hf_config(**GPU_CONFIG))
    return ref, d


def _gpu_model(d):
    # float16: the CUDA attention kernels take fp16/bf16 only (an explicit backend never falls back)
    return flm.GPT2LMHeadModel.from_pretrained(d, dtype=torch.float16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_decode_same_ids_as_eager(gpu_pair, backend, batch):
    """CUDA-graph decode == eager decode (greedy, same kernels), and the captured session serves the
    next prompt (same rows, length and settings) with the eager ids too; eos stops; sampling in the
    graph is reproducible under one seed."""
    gpu_backend_or_skip(backend)
    ref, d = gpu_pair
    model = _gpu_model(d)                                                  # fresh: no session yet
    vocab = ref.config.vocab_size
    lengths = [13] if batch == 1 else [13, 3, 9, 1, 13, 6, 11, 2]
    prompts = [left_padded(lengths, vocab), left_padded(lengths[::-1], vocab)]   # same P = 13
    kw = dict(max_new_tokens=40, pad_token_id=PAD)
    with fl.use_backend(backend):
        ids, mask = (t.cuda() for t in prompts[0])
        eager = model.generate(ids, attention_mask=mask, use_cuda_graph=False, **kw)
        assert fl.last_backend("attention_with_kvcache") == backend
        assert not getattr(model, "_graph_sessions", None), "use_cuda_graph=False captured a graph"
        graph = model.generate(ids, attention_mask=mask, use_cuda_graph=True, **kw)
        assert graph.shape == eager.shape == (batch, 13 + 40)
        assert torch.equal(graph, eager), f"graph {graph.tolist()}\neager {eager.tolist()}"
        sessions = model._graph_sessions
        assert len(sessions) == 1
        captured = next(iter(sessions.values())).graph
        assert captured is not None, "no graph was captured"
        # a second, different prompt: the same session replays its graph
        ids2, mask2 = (t.cuda() for t in prompts[1])
        eager2 = model.generate(ids2, attention_mask=mask2, use_cuda_graph=False, **kw)
        junk = [torch.full((64,), 7, dtype=torch.long, device="cuda") for _ in range(64)]   # reuse freed memory
        graph2 = model.generate(ids2, attention_mask=mask2, use_cuda_graph=True, **kw)
        del junk
        assert torch.equal(graph2, eager2), f"replayed session: graph {graph2.tolist()}\neager {eager2.tolist()}"
        assert not torch.equal(eager2, eager)
        assert len(model._graph_sessions) == 1 and next(iter(model._graph_sessions.values())).graph is captured
        # the default on a CUDA model is the graph
        assert torch.equal(model.generate(ids2, attention_mask=mask2, **kw), eager2)
        # eos: rows stop at different steps; the host checks for the end every sync_every tokens
        eos = _pick(eager[:, 13:], 0, [3, 4, 5, 2])
        for sync_every in (1, 16):
            e = model.generate(ids, attention_mask=mask, use_cuda_graph=False, eos_token_id=eos, **kw)
            for i in range(2):                    # the first call captures, the second replays
                junk = [torch.full((64,), 7, dtype=torch.long, device="cuda") for _ in range(64)]
                g = model.generate(ids, attention_mask=mask, use_cuda_graph=True, eos_token_id=eos,
                                   sync_every=sync_every, **kw)
                del junk
                assert torch.equal(g, e), f"eos={eos} sync_every={sync_every} call {i}: graph {g.tolist()}\n" \
                                          f"eager {e.tolist()}"
        # sampling in the graph: the same seed, the same ids (capturing call and replays alike)
        samples = []
        for _ in range(3):
            torch.manual_seed(3)
            samples.append(model.generate(ids, attention_mask=mask, do_sample=True, top_k=20, top_p=0.9,
                                          use_cuda_graph=True, **kw))
        assert torch.equal(samples[1], samples[2]), "replays of one seed differ"
        assert torch.equal(samples[0], samples[1]), "the capturing call and a replay of one seed differ"


@pytest.mark.gpu
def test_gpu_cuda_graph_session_per_backend(gpu_pair):
    """A session captured inside use_backend('triton') is not replayed inside use_backend('cuda')."""
    for b in ("triton", "cuda"):
        gpu_backend_or_skip(b)
    ref, d = gpu_pair
    model = _gpu_model(d)
    ids, mask = (t.cuda() for t in left_padded([5, 2], ref.config.vocab_size))
    kw = dict(max_new_tokens=10, pad_token_id=PAD)
    for b in ("triton", "cuda"):
        with fl.use_backend(b):
            g = model.generate(ids, attention_mask=mask, use_cuda_graph=True, **kw)
            # the capturing call runs one decode step eagerly: it ran on this block's backend
            assert fl.last_backend("attention_with_kvcache") == b, "a session of another backend was replayed"
            assert torch.equal(g, model.generate(ids, attention_mask=mask, use_cuda_graph=False, **kw))
    assert len(model._graph_sessions) == 2


@pytest.mark.gpu
def test_gpu_generate_matches_transformers_greedy(gpu_pair):
    """fp32 on the GPU through the torch backend (no TF32), CUDA graph on by default: transformers'
    CPU ids (checked well-conditioned)."""
    ref, d = gpu_pair
    model = flm.GPT2LMHeadModel.from_pretrained(d, device="cuda")
    ids, mask = left_padded([9, 4, 1], ref.config.vocab_size)
    want = hf_generate(ref, ids, mask, max_new_tokens=20, pad_token_id=PAD)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with fl.use_backend("torch"):
            got = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=20, pad_token_id=PAD)
            assert model._graph_sessions, "CUDA graphs are the default on a CUDA model"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.equal(got.cpu(), want), f"{got.tolist()}\n{want.tolist()}"
