"""BART generation jobs (`fastlayers bench --models bart`): fastlayers.models.BartForConditionalGeneration
.generate per requested backend against transformers' BartForConditionalGeneration.generate with the
SAME random weights (generation.py: rows, the ids check, the GPU time split).

- Models: GPU: bart-base (d_model 768, 6 + 6 layers, 12 heads, FFN 3072, vocab 50265, 1024
  positions) and bart-large (d_model 1024, 12 + 12 layers, 16 heads, FFN 4096) in the bench dtype
  (bf16); --quick: bart-base only. CPU (float32): a small config (d_model 256, 2 + 2 layers, 4 heads,
  FFN 1024; --quick: d_model 64, 2 heads, FFN 128).
- Cases: 64-token encoder inputs (mask all ones, ids outside the special tokens 0-3), 64 new
  tokens, beam search with num_beams=4 and greedy, each at batch 1 and batch 8 (CPU: 64 inputs, 16
  new tokens, batch 1 and 4; --quick: 32 inputs, 8 new tokens, batch 1 and 2). No early stop: every
  call makes exactly its new tokens (min_new_tokens = max_new_tokens, so eos never wins and every
  beam runs to the end), forced_bos/forced_eos off, no_repeat_ngram_size 0, length_penalty 1.
  Cells: tokens/s (batch x new tokens per generate call); the table's "time ms" is the latency of
  one generate call.
- Rows: transformers generate (dynamic cache, sdpa; the reference), fastlayers per backend (CUDA
  graph decode and beam search by default on a GPU) and on a GPU one "no graph" row per case, then
  transformers' static cache + torch.compile where its generate compiles the search (greedy; beam
  search is recorded "unsupported" with the reason read from the installed transformers' source).
The goal (issue 11, H200, bf16; benchmark figures, not tests): bart-base beam-4 at batch 1 >= 3x
transformers generate (report.GENERATION_GOALS).
"""
from __future__ import annotations

import torch

from .generation import Case, Family, Models, jobs_for
from .harness import Job
from .impls import Config

BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
BART_LARGE = dict(BART_BASE, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096)
BART_SMALL_CPU = dict(BART_BASE, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024)
BART_TINY_CPU = dict(BART_SMALL_CPU, d_model=64, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=128, decoder_ffn_dim=128)
FIRST_ID = 4          # bos 0, pad 1, eos 2, unk 3: never in the inputs

FAMILY = Family(group="bart", hf_class="BartForConditionalGeneration", hf_auto="AutoModelForSeq2SeqLM",
                hf_config="BartConfig", fl_class="BartForConditionalGeneration", encoder_decoder=True,
                generate_kwargs=dict(forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
                                     length_penalty=1.0, early_stopping=False))


def setup(cfg: Config) -> list[tuple[str, dict, list[Case]]]:
    """[(config name, transformers BartConfig fields, cases)]."""
    def cases(name, L, new, batches):
        return [Case(name, B, L, new, "decode", beams) for beams in (4, 1) for B in batches]
    if cfg.gpu:
        if cfg.quick:
            return [("bart-base", BART_BASE, cases("bart-base", 64, 64, (1, 8)))]
        return [(n, f, cases(n, 64, 64, (1, 8))) for n, f in (("bart-base", BART_BASE), ("bart-large", BART_LARGE))]
    if cfg.quick:
        return [("bart-tiny-cpu", BART_TINY_CPU, cases("bart-tiny-cpu", 32, 8, (1, 2)))]
    return [("bart-small-cpu", BART_SMALL_CPU, cases("bart-small-cpu", 64, 16, (1, 4)))]


def unit_of(case: Case) -> tuple[str, float]:
    return "tok/s", float(case.batch * case.new_tokens)


def make_inputs(cfg: Config, case: Case, vocab: int):
    def make():
        ids = torch.randint(FIRST_ID, vocab, (case.batch, case.prompt), device=cfg.device)     # (B, Ls)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}                     # (B, Ls) full
    return make


def fastlayers_loader(folder: str, dtype: torch.dtype, device: torch.device):
    from fastlayers.models import BartForConditionalGeneration
    return BartForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device)


def jobs(cfg: Config) -> list[Job]:
    models = [(Models(FAMILY, name, fields, cfg, lambda *a: fastlayers_loader(*a)), cases)
              for name, fields, cases in setup(cfg)]
    return jobs_for(FAMILY, cfg, models, lambda case, vocab: make_inputs(cfg, case, vocab), unit_of)
