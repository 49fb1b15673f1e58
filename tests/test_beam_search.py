"""Beam search (fastlayers.models.generation: `_beam_advance`, transformers' vectorised `_beam_search`
with the step on the device) against transformers' `generate`, on tiny random checkpoints saved by
transformers' save_pretrained and loaded by both libraries:
  - BART (encoder-decoder) on right-padded encoder batches (rows of different lengths): ids EXACTLY
    equal to transformers' for num_beams 2 and 4, length_penalty 0.5 / 1.0 / 2.0, early_stopping
    True / False / "never", no_repeat_ngram_size, min_length / min_new_tokens (min_new_tokens takes
    precedence, as in transformers), forced BOS / EOS, num_return_sequences > 1, eos hit early by
    some beams, two eos ids with more eos continuations than beams among the best 2 * num_beams,
    the folder's generation_config.json (num_beams=3 ...); greedy ids too;
  - sequences_scores within 1e-5 of transformers' (every comparison; per-step `scores` too when
    generate returns them), and equal to the model's own log-probabilities of the returned tokens,
    length-penalised;
  - sampling, with and without beams: reproducible under one seed; beam sampling's candidates drawn
    without replacement with torch.multinomial's pair frequencies;
  - GPT-2 (decoder-only) on a left-padded batch;
  - early termination: when every beam is done the output has transformers' length, our decode
    steps are transformers' forward calls (sync_every=1), sync_every 16 and a check never made give
    the same ids, and a step after the end changes no beam tensor and moves no cache row;
  - the Triton backend (interpreter on CPU); the errors generate raises.
GPU tests (marker gpu): the CUDA-graph beam search gives the eager ids (BART and GPT-2, batch 1 and 8,
4 beams, both kernel backends, fp16, head_dim 32 / 64), a captured session serves the next batch,
and bf16 too.

Near-ties. Our fp32 logits differ from transformers' by ~1e-6, and the accumulated beam scores by up
to ~1e-5 after 20 steps, so a comparison proves something only where transformers' own decisions
are well separated. `hf_reference` watches transformers' beam search from the inside (its helper
methods, wrapped on the instance): at every step the top-k continuations (and the one after them),
the merged finished hypotheses (and the one after them) and the early-stop heuristic's comparison
must be BEAM_MARGIN apart (divided by length ** length_penalty for penalised scores); greedy runs
check the best two processed scores. Inputs are drawn again (a few tries) when they are not, and
where a test needs a setting to matter (length penalties that choose different beams, early
stopping settings that part ways), the draw must show it in transformers' output -- so no test
passes vacuously, and none depends on one lucky seed (checked with FASTLAYERS_TEST_SEED 0-20).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from typing import Optional

import pytest
import torch
import transformers as hf

import fastlayers as fl
from fastlayers import models as flm
from fastlayers.models import generation as gen
from gpt2_helpers import MIN_MARGIN, finished_steps, left_padded
from gpt2_helpers import PAD as GPT2_PAD
from test_bart import BOS, EOS, PAD, _perturb
from test_bart import hf_config as bart_hf_config
from test_generation import GEN_CONFIG, LENGTHS, pair  # noqa: F401  (pair: the GPT-2 fixture)
from model_helpers import gpu_backend_or_skip

GPT2_V = GEN_CONFIG["vocab_size"]
BEAM_MARGIN = 5e-5       # >= 3x the accumulated-score differences of the two implementations
SCORE_ATOL = 1e-5        # sequences_scores vs transformers'
REAL = -1e5              # scores below are the -1e9 / -inf placeholders of impossible continuations
TRIES = 12               # input draws before a test gives up on finding a well-conditioned one

# The BART of these tests: decoder head_dim 5, encoder head_dim 7, untied lm_head. Small init and a
# weak cross-attention make continuations vary with the decoder's context (a random BART otherwise
# repeats one token per input); pad and bos are rarely chosen; eos is likely enough that hypotheses
# end at different steps, so length penalty and early stopping change the result.
BART_V = 64
BART_LENGTHS = [9, 5, 2]                  # encoder rows: full, right-padded, mostly padding
EOS_BIAS = 4.0
NEVER = BART_V - 1                        # a token never chosen: as eos_token_id, hypotheses run to the end


def _bart_reference(seed: int = 20240612, eos_bias: float = EOS_BIAS, **overrides) -> hf.BartForConditionalGeneration:
    kw = dict(vocab_size=BART_V, max_position_embeddings=40, tie_word_embeddings=False, init_std=0.1,
              forced_eos_token_id=None)
    kw.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = _perturb(hf.BartForConditionalGeneration(bart_hf_config("d35-e2x5-d2x7-tanh", **kw)))
        with torch.no_grad():
            for layer in ref.model.decoder.layers:
                layer.encoder_attn.out_proj.weight.mul_(0.3)
            ref.final_logits_bias[0, PAD] = -5.0
            ref.final_logits_bias[0, BOS] = -5.0
            ref.final_logits_bias[0, EOS] = eos_bias
            ref.final_logits_bias[0, NEVER] = -30.0
    return ref


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """(transformers model, fastlayers model, folder) of the tests' BART."""
    d = tmp_path_factory.mktemp("bart-beams")
    ref = _bart_reference()
    ref.save_pretrained(d)
    gc = ref.generation_config
    assert (gc.pad_token_id, gc.eos_token_id, gc.decoder_start_token_id, gc.forced_eos_token_id) == (PAD, EOS, EOS,
                                                                                                      None)
    return ref, flm.BartForConditionalGeneration.from_pretrained(d), d


@pytest.fixture(scope="module")
def bart_eager_eos(tmp_path_factory):
    """The same BART with eos far more likely: most hypotheses end within a few steps, which is
    where early_stopping's three settings part ways."""
    d = tmp_path_factory.mktemp("bart-beams-eos")
    ref = _bart_reference(eos_bias=6.0)
    ref.save_pretrained(d)
    return ref, flm.BartForConditionalGeneration.from_pretrained(d), d


def enc_batch(lengths=BART_LENGTHS, vocab=BART_V):
    """Encoder ids (B, max(lengths)) in [3, vocab), right-padded with PAD, and the mask."""
    L = max(lengths)
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, vocab, (len(lengths), L)).masked_fill(mask == 0, PAD)
    return ids, mask


def gpt2_batch():
    return left_padded(LENGTHS, GPT2_V)


# ------------------------------------------------------------------------------------ references
class IllConditioned(AssertionError):
    """transformers' run has a near-tie that a 1e-6 difference could flip: draw other inputs."""


def _separated(values: torch.Tensor, what: str, scale: Optional[torch.Tensor] = None) -> None:
    """values (n,): the real ones (not placeholders), sorted, each BEAM_MARGIN apart from the next --
    times the larger `scale` of the two where given (a length-penalised score's error is the sum's
    error / length ** length_penalty)."""
    scale = torch.ones_like(values) if scale is None else scale
    real = values > REAL
    v, order = values[real].sort(descending=True)
    if v.numel() > 1:
        sc = scale[real][order]
        if bool(((v[:-1] - v[1:]) < BEAM_MARGIN * torch.maximum(sc[:-1], sc[1:])).any()):
            raise IllConditioned(f"{what}: near-tie in {v.tolist()}")


LAST_RUN = {}     # what hf_reference saw in transformers' last beam search (see _watch_beam_decisions)


@contextlib.contextmanager
def _watch_beam_decisions(ref, eos_ids):
    """Wraps transformers' beam-search helpers on the instance to check every decision's margin.
    Records in LAST_RUN["eos_in_top_2n"] the most eos continuations among a row's best
    2 * num_beams at any step (above num_beams, keeping only 2 * num_beams would leave too few
    running beams: why transformers keeps (1 + len(eos)) * num_beams)."""
    top_k, finish, heuristic = ref._get_top_k_continuations, ref._update_finished_beams, ref._check_early_stop_heuristic
    latest = {}                                 # the finished hypotheses' beam indices, as last updated
    LAST_RUN["eos_in_top_2n"] = 0

    def top_k_checked(**kw):
        acc = kw["accumulated_log_probs"]                                           # (B, num_beams * V)
        if not kw["do_sample"]:
            for row in acc.topk(min(kw["beams_to_keep"] + 1, acc.shape[1]), dim=-1).values:
                _separated(row, f"step {kw['cur_len']}: top-k continuations")
        vals, idx = acc.topk(2 * kw["num_beams"], dim=-1)
        hits = torch.isin(idx % (acc.shape[1] // kw["num_beams"]), torch.tensor(eos_ids)) & (vals > REAL)
        LAST_RUN["eos_in_top_2n"] = max(LAST_RUN["eos_in_top_2n"], int(hits.sum(-1).max()))
        return top_k(**kw)

    def finish_checked(**kw):
        # transformers' merge, recomputed: the finished hypotheses' scores and the candidates'
        penalty = kw["length_penalty"]
        new_len = kw["cur_len"] + 1 - kw["decoder_prompt_len"]
        lp = kw["topk_log_probs"] / (new_len ** penalty)
        full = kw["is_sent_finished"].all(-1, keepdim=True) & (kw["early_stopping"] is True)
        lp = lp + full.float() * -1.0e9 + (~kw["is_early_stop_heuristic_unsatisfied"]).float() * -1.0e9
        lp = lp + (~(kw["next_token_hits_stopping_criteria"] & kw["top_num_beam_mask"][None, :])).float() * -1.0e9
        merged = torch.cat((kw["beam_scores"], lp), 1)                                   # (B, num_beams + k)
        old_len = (kw["beam_indices"] != -1).sum(-1).clamp(min=1).float()                 # finished lengths
        scale = torch.cat((old_len ** -penalty, torch.full_like(lp, float(new_len) ** -penalty)), 1)
        for row, sc in zip(merged, scale):
            top = row.topk(min(kw["num_beams"] + 1, row.numel())).indices
            _separated(row[top], f"step {kw['cur_len']}: finished hypotheses", sc[top])
        out = finish(**kw)
        latest["beam_indices"] = out[2]            # (sequences, beam_scores, beam_indices, is_sent_finished)
        return out

    def heuristic_checked(**kw):
        # best running score (at the hypothetical length) vs the worst finished one, rows still open
        if kw["early_stopping"] == "never" and kw["length_penalty"] > 0.0:
            length = kw["max_length"] - kw["decoder_prompt_len"]
        else:
            length = kw["cur_len"] - kw["decoder_prompt_len"]
        penalty = kw["length_penalty"]
        best = kw["running_beam_scores"][:, 0] / (length ** penalty)
        worst, at = kw["beam_scores"].min(1)
        worst_len = latest["beam_indices"].gather(1, at[:, None, None].expand(-1, 1, latest["beam_indices"].shape[2]))
        worst_len = worst_len[:, 0].ne(-1).sum(-1)                                       # the worst one's length
        margin = BEAM_MARGIN * torch.maximum(worst_len.clamp(min=1).float() ** -penalty,
                                             torch.tensor(float(length) ** -penalty))
        open_ = kw["is_early_stop_heuristic_unsatisfied"][:, 0] & kw["is_sent_finished"].all(1)
        for b in torch.nonzero(open_ & (best > REAL) & (worst > REAL)).flatten().tolist():
            if abs(float(best[b]) - float(worst[b])) < float(margin[b]):
                raise IllConditioned(f"step {kw['cur_len']}: early-stop heuristic near-tie "
                                     f"{float(best[b])} vs {float(worst[b])}")
        return heuristic(**kw)

    ref._get_top_k_continuations = top_k_checked
    ref._update_finished_beams = finish_checked
    ref._check_early_stop_heuristic = heuristic_checked
    try:
        yield
    finally:
        del ref._get_top_k_continuations, ref._update_finished_beams, ref._check_early_stop_heuristic


def _check_greedy(ref, out, P: int, kw: dict) -> None:
    """Greedy: at every step of every unfinished row the best processed score beats the second by
    MIN_MARGIN (gpt2_helpers.hf_generate's rule, with the decoder prompt length P)."""
    eos = kw.get("eos_token_id", ref.generation_config.eos_token_id)
    fin = finished_steps(out.sequences[:, P:], eos if eos is not None else [])
    for t, scores in enumerate(out.scores):
        top2 = scores.float().topk(2, dim=-1).values
        for b in range(scores.shape[0]):
            if fin[b] is not None and t > fin[b]:
                continue
            a, c = top2[b].tolist()
            if a != float("-inf") and c != float("-inf") and a - c < MIN_MARGIN:
                raise IllConditioned(f"greedy step {t} row {b}: best two scores {a} and {c} nearly tie")


@torch.no_grad()
def hf_reference(ref, ids, mask, **kw):
    """transformers' generate (return_dict_in_generate, output_scores) with every decision checked
    to be well separated; raises IllConditioned otherwise."""
    kw.setdefault("do_sample", False)
    P = 1 if ref.config.is_encoder_decoder else ids.shape[1]
    beams = kw.get("num_beams", ref.generation_config.num_beams or 1) > 1
    eos = kw.get("eos_token_id", ref.generation_config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    with _watch_beam_decisions(ref, eos) if beams else contextlib.nullcontext():
        out = ref.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kw)
    if not beams and not kw["do_sample"]:
        _check_greedy(ref, out, P, kw)
    return out


def conditioned(ref, draw, *settings, differ=None):
    """Inputs from draw() on which transformers' run of every setting is well conditioned and
    (differ: a predicate over the list of transformers' sequences) shows what the test needs.
    A setting is a kwargs dict, or a function (ids, mask) -> kwargs dict (e.g. an eos the draw's
    hypotheses emit; it raises IllConditioned when the draw has none). Returns (ids, mask,
    [transformers' outputs], [kwargs dicts])."""
    last = None
    for _ in range(TRIES):
        ids, mask = draw()
        try:
            kws = [s(ids, mask) if callable(s) else s for s in settings]
            outs = [hf_reference(ref, ids, mask, **kw) for kw in kws]
        except IllConditioned as e:
            last = e
            continue
        if differ is not None and not differ([o.sequences for o in outs]):
            last = "the settings made no difference to transformers' ids"
            continue
        return ids, mask, outs, kws
    raise AssertionError(f"test setup: no well-conditioned draw in {TRIES} tries (last: {last})")


def assert_same(ours, ids, mask, want, **kw):
    """Our generate equals transformers' output `want`: ids exactly, sequences_scores within
    SCORE_ATOL (beam search); the plain tensor return equals the dict's. Returns our sequences."""
    got = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kw)
    seq = got.sequences
    assert seq.dtype == torch.long
    assert seq.shape == want.sequences.shape, f"shape {tuple(seq.shape)} != transformers' " \
                                              f"{tuple(want.sequences.shape)} ({kw})"
    assert torch.equal(seq, want.sequences), f"{kw}: ids differ from transformers':\nours   {seq.tolist()}\n" \
                                             f"theirs {want.sequences.tolist()}"
    if getattr(want, "sequences_scores", None) is not None:
        assert got.sequences_scores is not None and got.sequences_scores.shape == want.sequences_scores.shape
        err = (got.sequences_scores - want.sequences_scores).abs().max().item()
        assert err <= SCORE_ATOL, f"{kw}: sequences_scores differ by {err:.2e}:\nours   " \
                                  f"{got.sequences_scores.tolist()}\ntheirs {want.sequences_scores.tolist()}"
    if got.scores is not None and want.scores is not None:
        # per step, transformers' processed scores (beam search: the running beams' log-probabilities)
        assert len(got.scores) == len(want.scores), f"{kw}: {len(got.scores)} steps of scores, transformers " \
                                                    f"{len(want.scores)}"
        for t, (a, b) in enumerate(zip(got.scores, want.scores)):
            assert torch.equal(a.isfinite(), b.isfinite()), f"{kw}: step {t}: -inf at other places"
            err = (a - b)[b.isfinite()].abs().max().item() if bool(b.isfinite().any()) else 0.0
            assert err <= 1e-4, f"{kw}: step {t}: scores differ by {err:.2e}"
    plain = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(plain, seq), f"{kw}: return_dict_in_generate changed the ids"
    return seq


def same_as_transformers(pair_, draw, *settings, differ=None):
    """conditioned() then assert_same() for every setting; returns (ids, mask, [our sequences])."""
    ref, ours = pair_[0], pair_[1]
    ids, mask, wants, kws = conditioned(ref, draw, *settings, differ=differ)
    return ids, mask, [assert_same(ours, ids, mask, w, **kw) for w, kw in zip(wants, kws)]


@torch.no_grad()
def eos_emitted(ref, base: dict, P: int, steps=(1, 2, 3), avoid=()):
    """A setting: base + eos_token_id = a token the draw's best hypotheses (transformers' run of
    base) emit at one of `steps` (0 = the first new token), so some hypotheses hit it early."""
    def setting(ids, mask):
        seqs = ref.generate(ids, attention_mask=mask, **base)
        for t in steps:
            for tok in seqs[:, P + t].tolist():
                if tok not in avoid:
                    setting.eos = tok
                    return dict(base, eos_token_id=tok)
        raise IllConditioned(f"no eos candidate at steps {steps}: {seqs.tolist()}")
    return setting


def all_differ(seqs) -> bool:
    return all(not (a.shape == b.shape and torch.equal(a, b)) for i, a in enumerate(seqs) for b in seqs[i + 1:])


def first_differs(seqs) -> bool:
    return all(not (seqs[0].shape == b.shape and torch.equal(seqs[0], b)) for b in seqs[1:])


def gen_lengths(seqs: torch.Tensor, eos, P: int = 1) -> list:
    """Per row, the generated tokens up to and including the first eos (all of them without one)."""
    fin = finished_steps(seqs[:, P:], eos)
    return [seqs.shape[1] - P if f is None else f + 1 for f in fin]


# ------------------------------------------------------------------------------------ BART: greedy
def test_bart_greedy_ids_equal(bart):
    """num_beams=1 (the folder's default) on a padded encoder batch; eos stops some rows."""
    _, _, (got,) = same_as_transformers(bart, enc_batch, dict(max_new_tokens=12))
    assert got[:, 0].eq(EOS).all(), "decoder sequences start with decoder_start_token_id"
    _, _, (got,) = same_as_transformers(bart, enc_batch, dict(max_new_tokens=12, eos_token_id=NEVER))
    assert got.shape == (len(BART_LENGTHS), 13)


# ------------------------------------------------------------------------------------ BART: beams
@pytest.mark.parametrize("num_beams", [2, 4])
def test_bart_beam_ids_equal_across_length_penalties(bart, num_beams):
    """length_penalty 0.5 / 1.0 / 2.0 on one draw where they choose different hypotheses."""
    settings = [dict(num_beams=num_beams, max_new_tokens=12, length_penalty=lp) for lp in (0.5, 1.0, 2.0)]
    _, _, got = same_as_transformers(bart, enc_batch, *settings, differ=lambda s: first_differs(s[::2]))
    assert not (got[0].shape == got[2].shape and torch.equal(got[0], got[2]))
    for seqs, kw in zip(got, settings):
        assert seqs.shape[0] == len(BART_LENGTHS) and seqs[:, 0].eq(EOS).all()


@pytest.mark.parametrize("num_beams,length_penalty", [(2, 2.0), (4, 1.0), (4, 2.0)])
def test_bart_beam_ids_equal_across_early_stopping(bart_eager_eos, num_beams, length_penalty):
    """early_stopping True / False / "never" on one draw where they give three different results
    (length_penalty 1: True differs from the others; "never" only departs from False where a
    positive penalty makes it assume the longest length)."""
    settings = [dict(num_beams=num_beams, max_new_tokens=12, length_penalty=length_penalty, early_stopping=e)
                for e in (True, False, "never")]
    _, _, got = same_as_transformers(bart_eager_eos, enc_batch, *settings,
                                     differ=all_differ if length_penalty != 1.0 else first_differs)
    assert got[0].shape[1] <= got[1].shape[1] <= got[2].shape[1], "early_stopping=True searches least"


@pytest.mark.parametrize("n", [2, 3])
def test_bart_no_repeat_ngram_size(bart, n):
    settings = [dict(num_beams=4, max_new_tokens=14, eos_token_id=NEVER)]
    settings.append(dict(settings[0], no_repeat_ngram_size=n))
    _, _, (plain, got) = same_as_transformers(bart, enc_batch, *settings, differ=first_differs)
    for row in got.tolist():
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        assert len(grams) == len(set(grams)), f"a repeated {n}-gram in {row}"


def test_bart_min_length_and_min_new_tokens(bart_eager_eos):
    """eos is likely from the first step: min_length (decoder length, start token included) and
    min_new_tokens hold it back; with both, min_new_tokens takes precedence (transformers replaces
    min_length by min_new_tokens + the decoder prompt length, even for min_new_tokens=0)."""
    base = dict(num_beams=4, max_new_tokens=10, length_penalty=0.5)
    settings = [base, dict(base, min_new_tokens=4), dict(base, min_length=6),
                dict(base, min_new_tokens=2, min_length=6), dict(base, min_new_tokens=0, min_length=6)]
    _, _, got = same_as_transformers(bart_eager_eos, enc_batch, *settings,
                                     differ=lambda s: first_differs(s[:4]) and first_differs(s[2:4]))
    for seqs, m in zip(got[1:4], (4, 5, 2)):
        assert not seqs[:, 1:1 + m].eq(EOS).any(), f"eos within the first {m} new tokens: {seqs.tolist()}"
    assert torch.equal(got[4], got[0]), "min_new_tokens=0 lifts min_length"


def test_bart_forced_bos_and_forced_eos(bart):
    base = dict(num_beams=4, max_new_tokens=8, eos_token_id=NEVER)
    settings = [base, dict(base, forced_bos_token_id=BOS), dict(base, forced_eos_token_id=EOS),
                dict(base, forced_bos_token_id=BOS, forced_eos_token_id=EOS, num_return_sequences=2)]
    _, _, (plain, bos, eos, both) = same_as_transformers(bart, enc_batch, *settings, differ=all_differ)
    assert bos[:, 1].eq(BOS).all() and both[:, 1].eq(BOS).all(), "forced_bos_token_id is the first new token"
    # the hypotheses run to max_length (eos_token_id is never emitted), so the last token is the forced one
    assert eos.shape[1] == both.shape[1] == 9 and eos[:, -1].eq(EOS).all() and both[:, -1].eq(EOS).all()
    assert not eos[:, 1:-1].eq(EOS).all(), "only the last token is forced"


@pytest.mark.parametrize("n", [2, 4])
def test_bart_num_return_sequences(bart, n):
    """The n best finished hypotheses per input, adjacent and best first, with their scores."""
    kw = dict(num_beams=4, num_return_sequences=n, max_new_tokens=10, length_penalty=0.5)
    ref, ours, _ = bart
    ids, mask, (want,), _ = conditioned(ref, enc_batch, kw)
    got = assert_same(ours, ids, mask, want, **kw)
    assert got.shape[0] == len(BART_LENGTHS) * n
    scores = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
                           **kw).sequences_scores.view(-1, n)
    assert (scores[:, :-1] >= scores[:, 1:]).all(), f"not best first: {scores.tolist()}"
    for b in range(len(BART_LENGTHS)):
        assert len({tuple(r) for r in got[b * n:(b + 1) * n].tolist()}) == n, f"input {b}: repeated hypotheses"


def test_bart_eos_hit_early_by_some_beams(bart):
    """Some returned hypotheses end with eos before max_length (padded after it with pad_token_id),
    others run to the end; an eos list (one more token) finishes others; early_stopping="never"
    with a length penalty above 1 keeps the long ones."""
    base = dict(num_beams=4, num_return_sequences=4, max_new_tokens=10)

    def mixed(seqs):
        lengths = gen_lengths(seqs[0], EOS)
        return min(lengths) < 10 and max(lengths) == 10

    settings = [base, dict(base, early_stopping="never", length_penalty=2.0)]
    _, _, (got, never) = same_as_transformers(bart, enc_batch, *settings, differ=mixed)
    for row, n in zip(got.tolist(), gen_lengths(got, EOS)):
        if n < 10:
            assert row[n] == EOS and all(t == PAD for t in row[n + 1:]), f"not padded after eos: {row}"
    assert max(gen_lengths(never, EOS)) == 10


def test_bart_eos_list_more_eos_than_beams_in_the_top(bart_eager_eos):
    """Two eos ids (EOS, very likely, and the draw's most frequent other token): more than
    num_beams of the best 2 * num_beams continuations end a hypothesis at some step, so the search
    must keep (1 + 2) * num_beams continuations, as transformers, to go on with num_beams."""
    ref = bart_eager_eos[0]
    base = dict(num_beams=4, num_return_sequences=2, max_new_tokens=10, length_penalty=2.0)

    @torch.no_grad()
    def two_eos(ids, mask):
        seqs = ref.generate(ids, attention_mask=mask, **dict(base, eos_token_id=NEVER))
        tokens = seqs[:, 1:].flatten()
        tokens = tokens[(tokens != EOS) & (tokens != PAD)]
        return dict(base, eos_token_id=[EOS, int(tokens.mode().values)])

    same_as_transformers(bart_eager_eos, enc_batch, two_eos, differ=lambda _: LAST_RUN["eos_in_top_2n"] > 4)


def test_bart_sequences_scores_are_the_length_penalised_log_probs(bart):
    """sequences_scores (already within 1e-5 of transformers') equal the model's own log-probabilities
    of each returned hypothesis' tokens (the full forward), summed and divided by length ** penalty."""
    ref, ours, _ = bart
    kw = dict(num_beams=4, num_return_sequences=3, max_new_tokens=9, length_penalty=1.5)
    ids, mask, (want,), _ = conditioned(ref, enc_batch, kw)
    assert_same(ours, ids, mask, want, **kw)
    out = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kw)
    seqs, scores = out.sequences, out.sequences_scores
    with torch.no_grad():
        logits = ours(input_ids=ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                      decoder_input_ids=seqs[:, :-1]).logits.float()
    lp = logits.log_softmax(-1).gather(2, seqs[:, 1:, None])[..., 0]                    # (N, L - 1)
    for i, n in enumerate(gen_lengths(seqs, EOS)):
        expect = lp[i, :n].sum() / n ** 1.5
        assert abs(float(expect) - float(scores[i])) <= 1e-5, f"hypothesis {i}: {float(scores[i])} vs {float(expect)}"


def test_bart_generation_config_json_defaults(bart, tmp_path):
    """num_beams=3 and its companions from the folder's generation_config.json, for both libraries;
    a kwarg still overrides the file."""
    ref, ours, d = bart
    folder = tmp_path / "with-beams"
    shutil.copytree(d, folder)
    cfg = json.loads((folder / "generation_config.json").read_text())
    cfg.update(num_beams=3, length_penalty=1.5, early_stopping=True, no_repeat_ngram_size=2, max_length=12,
               min_length=4, forced_bos_token_id=BOS, forced_eos_token_id=EOS)
    (folder / "generation_config.json").write_text(json.dumps(cfg))
    ref2 = hf.BartForConditionalGeneration.from_pretrained(folder).eval()
    ours2 = flm.BartForConditionalGeneration.from_pretrained(folder)
    assert ref2.generation_config.num_beams == 3 and ours2.generation_config.num_beams == 3
    ids, mask, (want, want1), _ = conditioned(ref2, enc_batch, {}, dict(num_beams=1), differ=first_differs)
    got = assert_same(ours2, ids, mask, want)                                      # every setting from the file
    assert got[:, 1].eq(BOS).all() and got.shape[1] <= 12
    assert_same(ours2, ids, mask, want1, num_beams=1)                               # a kwarg overrides the file


# ------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("num_beams", [1, 2])
def test_bart_sampling_reproducible_under_manual_seed(bart, num_beams):
    ref, ours, _ = bart
    ids, mask = enc_batch()
    kw = dict(do_sample=True, num_beams=num_beams, max_new_tokens=10, top_k=20, temperature=1.5,
              eos_token_id=NEVER)
    runs = []
    for seed in (7, 7, 8, 9):
        torch.manual_seed(seed)
        runs.append(ours.generate(ids, attention_mask=mask, **kw))
    assert torch.equal(runs[0], runs[1]), "the same seed gave different ids"
    assert not (torch.equal(runs[0], runs[2]) and torch.equal(runs[0], runs[3])), "other seeds: the same ids"
    torch.manual_seed(7)
    theirs = ref.generate(ids, attention_mask=mask, **kw)
    assert runs[0].shape == theirs.shape == (len(BART_LENGTHS), 11)
    greedy = ours.generate(ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=10, eos_token_id=NEVER)
    assert not all(torch.equal(r, greedy) for r in runs), "sampling gave the deterministic search's ids"


def test_sample_without_replacement_is_successive_draws():
    """Beam sampling's k distinct candidates (Gumbel-top-k) follow torch.multinomial(replacement=False):
    P(first=i, second=j) = p_i p_j / (1 - p_i), checked on 200000 rows within 5 sigma."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0, float("-inf")])
    p = logits.double().softmax(-1)
    n = 200_000
    idx = gen.sample_without_replacement(logits.expand(n, -1), 2)                      # (n, 2)
    assert (idx[:, 0] != idx[:, 1]).all() and (idx != 5).all(), "a repeated or impossible candidate"
    counts = torch.zeros(6, 6, dtype=torch.float64)
    counts.index_put_((idx[:, 0], idx[:, 1]), torch.ones(n, dtype=torch.float64), accumulate=True)
    expect = p[:, None] * p[None, :] / (1 - p[:, None])
    expect.fill_diagonal_(0)
    sigma = (expect * (1 - expect) / n).sqrt()
    err = (counts / n - expect).abs()
    assert (err <= 5 * sigma + 1e-12).all(), f"pair frequencies off: max {(err / (sigma + 1e-12)).max():.1f} sigma"


# ------------------------------------------------------------------------------------ GPT-2
@pytest.mark.parametrize("num_beams", [2, 4])
def test_gpt2_beam_ids_equal_left_padded(pair, num_beams):  # noqa: F811
    """Decoder-only: prompts of lengths 7 / 4 / 1, left-padded; length penalties and
    num_return_sequences; an eos some hypotheses hit (finished ones filled as transformers fills
    them: `pad_token_id or eos_token_id`, so eos here, pad_token_id being 0)."""
    ref = pair[0]
    P = max(LENGTHS)
    base = dict(num_beams=num_beams, max_new_tokens=10, pad_token_id=GPT2_PAD)
    settings = [dict(base, length_penalty=lp, num_return_sequences=2) for lp in (0.5, 2.0)]
    ids, mask, got = same_as_transformers(pair, gpt2_batch, *settings)
    assert got[0].shape == (2 * len(LENGTHS), P + 10) and torch.equal(got[0][::2, :P], ids)
    hit = eos_emitted(ref, dict(base, num_return_sequences=num_beams), P, avoid=(GPT2_PAD,))
    ids, mask, (want,), (kw,) = conditioned(ref, gpt2_batch, hit,
                                            differ=lambda s: min(gen_lengths(s[0], hit.eos, P)) < 10)
    seqs = assert_same(pair[1], ids, mask, want, **kw)
    lengths = gen_lengths(seqs, kw["eos_token_id"], P)
    assert min(lengths) < 10, f"no hypothesis hit eos {kw['eos_token_id']}: {seqs.tolist()}"
    for row, n in zip(seqs[:, P:].tolist(), lengths):
        assert all(t == kw["eos_token_id"] for t in row[n:]), f"not filled with eos after it: {row}"


# ------------------------------------------------------------------------------------ early termination
def _count_calls(obj, name: str, counter: list):
    fn = getattr(obj, name)

    def counted(*a, **kw):
        counter.append(1)
        return fn(*a, **kw)
    setattr(obj, name, counted)


def _forward_calls(ref, ids, mask, kw) -> int:
    """How many times transformers' generate runs the model (prefill included)."""
    calls = []
    handle = ref.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            ref.generate(ids, attention_mask=mask, **kw)
    finally:
        handle.remove()
    return len(calls)


def _our_runs(ours, ids, mask, kw, sync_every):
    """Our generate's ids and how many decode steps it ran (no output_scores: collecting per-step
    scores makes the host read every step, whatever sync_every says)."""
    steps = []
    _count_calls(ours, "_decode_step", steps)
    try:
        got = ours.generate(ids, attention_mask=mask, sync_every=sync_every, **kw)
    finally:
        del ours._decode_step
    return got, len(steps)


@pytest.mark.parametrize("early_stopping", [True, False])
def test_bart_all_beams_finish_early(bart_eager_eos, early_stopping):
    """eos so likely that every beam finishes within a few steps: the output has transformers'
    length (well short of max_new_tokens); with sync_every=1 we run exactly transformers' number
    of decode steps; sync_every 16, and a check never made, give the same ids and scores (the
    steps after the end change nothing)."""
    ref, ours, _ = bart_eager_eos
    kw = dict(num_beams=4, num_return_sequences=2, max_new_tokens=30, early_stopping=early_stopping,
              length_penalty=0.8)
    ids, mask, (want,), _ = conditioned(ref, lambda: enc_batch([9, 6, 3, 8]), kw,
                                        differ=lambda s: s[0].shape[1] - 1 < 30 // 2)      # ends early
    assert_same(ours, ids, mask, want, **kw)                                  # ids and sequences_scores
    theirs = _forward_calls(ref, ids, mask, kw)
    for sync_every in (1, 16, 1000):
        got, steps = _our_runs(ours, ids, mask, kw, sync_every)
        assert torch.equal(got, want.sequences), f"sync_every={sync_every}:\nours   {got.tolist()}\n" \
                                                 f"theirs {want.sequences.tolist()}"
        if sync_every == 1:
            assert steps == theirs, f"{steps} decode steps, transformers ran the model {theirs} times"
        elif sync_every == 1000:
            assert steps == 30, "sync_every beyond max_new_tokens: every step runs"


@pytest.mark.parametrize("early_stopping", [True, False])
def test_steps_after_the_end_change_nothing(bart_eager_eos, monkeypatch, early_stopping):
    """Once the search is over (`done`), the steps the device runs until the host looks change no
    beam-search tensor (running and finished hypotheses, their scores, indices and flags) and
    leave the cache's filled slots where they are (the reorder is the identity)."""
    ours = bart_eager_eos[1]
    real = gen._beam_advance
    names = ("sequences", "beam_scores", "running_scores", "running_indices", "beam_indices", "is_finished",
             "heuristic_unsatisfied")
    after_end = []

    def checked(logits, st, s):
        if not bool(st.done):
            return real(logits, st, s)
        filled = int(st.cache.seqlens.max())                     # this step's k/v are written already
        before = {n: getattr(st.beams, n).clone() for n in names}
        tokens, cache = st.tokens.clone(), [t[:, :filled].clone() for t in st.cache.k + st.cache.v]
        real(logits, st, s)
        after_end.append(filled)
        for n in names:
            assert torch.equal(getattr(st.beams, n), before[n]), f"{n} changed after the end"
        assert torch.equal(st.tokens, tokens), "the running sequences changed after the end"
        for i, (t, c) in enumerate(zip(st.cache.k + st.cache.v, cache)):
            assert torch.equal(t[:, :filled], c), f"cache tensor {i}: rows moved after the end"
        assert bool(st.done), "done is sticky"

    monkeypatch.setattr(gen, "_beam_advance", checked)
    kw = dict(num_beams=4, num_return_sequences=2, max_new_tokens=20, early_stopping=early_stopping)
    for _ in range(TRIES):
        ids, mask = enc_batch([9, 6, 3, 8])
        after_end.clear()
        got = ours.generate(ids, attention_mask=mask, sync_every=1000, **kw)
        if len(after_end) > 5:
            break
    assert len(after_end) > 5, f"the search ended {len(after_end)} steps before max_new_tokens: the test proves little"
    monkeypatch.setattr(gen, "_beam_advance", real)
    assert torch.equal(got, ours.generate(ids, attention_mask=mask, sync_every=1, **kw))


def test_gpt2_all_beams_finish_early(pair):  # noqa: F811
    """Decoder-only: every prompt's beams finish (early_stopping=True) well before max_new_tokens;
    eos: a list, each prompt's best hypothesis' second token."""
    ref, ours, _ = pair
    P = max(LENGTHS)
    base = dict(num_beams=4, max_new_tokens=20, pad_token_id=GPT2_PAD, early_stopping=True)

    @torch.no_grad()
    def each_rows_eos(ids, mask):
        seqs = ref.generate(ids, attention_mask=mask, **base)
        return dict(base, eos_token_id=sorted({t for t in seqs[:, P + 1].tolist() if t != GPT2_PAD}))

    ids, mask, (want,), (kw,) = conditioned(ref, gpt2_batch, each_rows_eos, differ=lambda s: s[0].shape[1] < P + 15)
    theirs = _forward_calls(ref, ids, mask, kw)
    for sync_every in (1, 16):
        got, steps = _our_runs(ours, ids, mask, kw, sync_every)
        assert torch.equal(got, want.sequences), f"sync_every={sync_every}:\nours   {got.tolist()}\n" \
                                                 f"theirs {want.sequences.tolist()}"
        if sync_every == 1:
            assert 1 + steps == theirs, f"prefill + {steps} decode steps, transformers ran the model {theirs} times"


# ------------------------------------------------------------------------------------ backends
def test_triton_backend_bart_beams(tmp_path):
    """One tiny BART (head_dim 8: the Triton attention takes multiples of 8), 2 beams, through the
    Triton kernels (the interpreter on CPU)."""
    info = fl.available_backends()["triton"]
    if not info["available"]:
        pytest.skip(f"triton backend not available here: {info['reason']}")
    with torch.random.fork_rng():
        torch.manual_seed(5)
        cfg = bart_hf_config("d16-e3x4-d1x2-relu-scaled", encoder_layers=1, encoder_attention_heads=2,
                             tie_word_embeddings=False, init_std=0.1)
        ref = _perturb(hf.BartForConditionalGeneration(cfg))
        with torch.no_grad():
            ref.final_logits_bias[0, EOS] = 3.0
    ref.save_pretrained(tmp_path)
    ours = flm.BartForConditionalGeneration.from_pretrained(tmp_path)
    kw = dict(num_beams=2, max_new_tokens=4, num_return_sequences=2)
    ids, mask, (want,), _ = conditioned(ref, lambda: enc_batch([5, 3], cfg.vocab_size), kw)
    with fl.use_backend("triton"):
        got = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kw)
        for op in ("linear", "layer_norm", "attention", "attention_with_kvcache"):
            assert fl.last_backend(op) == "triton", f"{op} ran on {fl.last_backend(op)!r}"
    assert torch.equal(got.sequences, want.sequences), f"{got.sequences.tolist()} != {want.sequences.tolist()}"
    assert (got.sequences_scores - want.sequences_scores).abs().max() <= SCORE_ATOL


# ------------------------------------------------------------------------------------ errors
def test_beam_search_errors_name_the_argument(bart):
    _, ours, _ = bart
    ids, mask = enc_batch()
    with pytest.raises(ValueError, match="num_return_sequences: at most num_beams=2, got 3"):
        ours.generate(ids, attention_mask=mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="streamer"):
        ours.generate(ids, attention_mask=mask, num_beams=2, streamer=lambda tokens: None)
    for bad in ("always", "True", 2, "false"):
        with pytest.raises(ValueError, match="early_stopping"):
            ours.generate(ids, attention_mask=mask, num_beams=2, early_stopping=bad)
    for bad in ("1.0", True, [1.0]):
        with pytest.raises(ValueError, match="length_penalty"):
            ours.generate(ids, attention_mask=mask, num_beams=2, length_penalty=bad)


# ------------------------------------------------------------------------------------ GPU
def _gpu_bart(folder, head_dim: int):
    """A BART with head_dim 32 or 64 (what both kernel backends compile), saved by transformers."""
    d_model = 4 * head_dim
    with torch.random.fork_rng():
        torch.manual_seed(head_dim)
        cfg = hf.BartConfig(vocab_size=512, d_model=d_model, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                            decoder_ffn_dim=2 * d_model, max_position_embeddings=128, dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, bos_token_id=BOS,
                            eos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=None,
                            tie_word_embeddings=False, init_std=0.05)
        ref = hf.BartForConditionalGeneration(cfg)
        with torch.no_grad():
            ref.final_logits_bias.normal_()
            ref.final_logits_bias[0, EOS] = 2.0
    ref.save_pretrained(folder)
    return cfg


def _gpu_gpt2(folder, head_dim: int):
    from gpt2_helpers import checkpoint, hf_config
    with torch.random.fork_rng():
        torch.manual_seed(head_dim)
        cfg = hf_config(**{**GEN_CONFIG, "vocab_size": 512, "n_embd": 4 * head_dim, "n_head": 4, "n_positions": 128,
                           "initializer_range": 0.1})
        checkpoint(folder, hf.GPT2LMHeadModel, cfg)
    return cfg


def _graph_vs_eager(model, batches, kw):
    """Each batch: eager ids, then CUDA-graph ids (the first call captures, later ones replay the
    same session); every graph run must equal its eager run. Returns the eager ids."""
    eager = []
    for ids, mask in batches:
        e = model.generate(ids, attention_mask=mask, use_cuda_graph=False, **kw)
        for i in range(2):
            # fill freed memory: a replay reading a stale address would see junk
            junk = [torch.full((64,), 7, dtype=torch.long, device=model.device) for _ in range(64)]
            g = model.generate(ids, attention_mask=mask, use_cuda_graph=True, **kw)
            del junk
            assert g.shape == e.shape and torch.equal(g, e), f"{kw} call {i}: graph {g.tolist()}\neager {e.tolist()}"
        eager.append(e)
    return eager


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_gpu_cuda_graph_beam_search_same_ids_as_eager(tmp_path, family, backend, batch, head_dim):
    """fp16, 4 beams: the CUDA-graph beam search (decode step, log-softmax, processors, top-2k,
    cache reorder in one graph) gives the eager ids; the captured session serves another batch of
    the same shape (one session, its graph kept); eos with sync_every 1 and 16; 2 returned
    sequences per input."""
    gpu_backend_or_skip(backend)
    if family == "bart":
        cfg = _gpu_bart(tmp_path, head_dim)
        model = flm.BartForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16, device="cuda")
        lengths = [40] if batch == 1 else [40, 7, 33, 1, 40, 12, 25, 3]

        def draw():
            ids, mask = enc_batch(lengths, cfg.vocab_size)
            return ids.cuda(), mask.cuda()
    else:
        cfg = _gpu_gpt2(tmp_path, head_dim)
        model = flm.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float16, device="cuda")
        lengths = [13] if batch == 1 else [13, 3, 9, 1, 13, 6, 11, 2]

        def draw():
            ids, mask = left_padded(lengths, cfg.vocab_size)
            return ids.cuda(), mask.cuda()
    heads = [(cfg.n_embd, cfg.n_head)] if family == "gpt2" else [(cfg.d_model, cfg.encoder_attention_heads),
                                                                 (cfg.d_model, cfg.decoder_attention_heads)]
    assert all(width // n == head_dim for width, n in heads)
    pad = PAD if family == "bart" else GPT2_PAD
    kw = dict(num_beams=4, max_new_tokens=24, pad_token_id=pad)
    with fl.use_backend(backend):
        first, second = draw(), draw()
        e1, e2 = _graph_vs_eager(model, [first, second], kw)
        assert fl.last_backend("attention_with_kvcache") == backend
        assert not torch.equal(e1, e2), "two batches gave the same ids: the replay proves little"
        sessions = model._graph_sessions
        assert len(sessions) == 1 and next(iter(sessions.values())).graph is not None, "one captured session"
        # eos some hypotheses hit; the host checks for the end every sync_every steps
        P = 1 if family == "bart" else first[0].shape[1]
        eos = next(t for t in e1[:, P + 1:P + 4].flatten().tolist() if t != pad)
        for sync_every in (1, 16):
            _graph_vs_eager(model, [first], dict(kw, eos_token_id=eos, sync_every=sync_every))
        # 2 sequences per input, and a length penalty that favours long ones (no output_scores: the
        # per-step scores are read on the host each step, so generate runs eagerly then)
        _graph_vs_eager(model, [first], dict(kw, eos_token_id=eos, num_return_sequences=2, length_penalty=2.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16_beam_search_graph_equals_eager(tmp_path, backend):
    """bf16 BART, 4 beams, batch 8, length penalty and early stopping: graph ids == eager ids."""
    gpu_backend_or_skip(backend)
    cfg = _gpu_bart(tmp_path, 64)
    model = flm.BartForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    ids, mask = enc_batch([40, 7, 33, 1, 40, 12, 25, 3], cfg.vocab_size)
    kw = dict(num_beams=4, max_new_tokens=24, length_penalty=1.5, early_stopping=True, no_repeat_ngram_size=3,
              num_return_sequences=2)
    with fl.use_backend(backend):
        _graph_vs_eager(model, [(ids.cuda(), mask.cuda())], kw)
