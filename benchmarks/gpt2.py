"""GPT-2 generation jobs (`fastlayers bench --models gpt2`): fastlayers.models.GPT2LMHeadModel.generate
per requested backend against transformers' GPT2LMHeadModel.generate with the SAME random weights
(generation.py: rows, the ids check, the GPU time split).

- Models: GPU: gpt2 (124M: vocab 50257, 1024 positions, n_embd 768, 12 layers, 12 heads) and
  gpt2-medium (355M: n_embd 1024, 24 layers, 16 heads) in the bench dtype (bf16); --quick: gpt2 only.
  CPU (float32): a small config (n_embd 256, 4 layers, 4 heads; --quick: n_embd 64, 2 layers).
- Cases, greedy, every prompt full (mask all ones), ids drawn from the vocabulary minus eos (50256):
  - decode latency at batch 1: a 32-token prompt, 256 new tokens (CPU: 32; --quick CPU: 16 after
    16), in ms per token = the whole generate call / new tokens (the prompt's prefill included, about
    one step's cost);
  - batched decode at batch 8 and 32 (--quick: 8; CPU: 8 with 16 new tokens, --quick CPU: 4) in
    tokens/s (batch x new tokens / call);
  - prefill at batch 8 x 512 prompt tokens (CPU: 2 x 128, --quick: 2 x 64): generate with one new
    token (the time to the first token, each library's generate overhead included) in prompt
    tokens/s.
  Every call makes exactly its new tokens: min_new_tokens = max_new_tokens on both sides, pad_token_id
  = eos (GPT-2 has no pad; no row ever pads).
- Rows: transformers generate (dynamic cache, sdpa; the reference), fastlayers per backend (CUDA
  graph decode by default on a GPU) and on a GPU one "no graph" row (use_cuda_graph=False) per decode
  case, then transformers' static cache + torch.compile (run last; skipped on CPU). Its prefill row
  measures what transformers' generate does for the first forward under that recipe (5.24 sends the
  prefill through the compiled call as well; older versions run it eager).
The goal (issue 10, H200, bf16; benchmark figures, not tests): gpt2 at batch 1 <= 0.5 ms per token
and >= 1.3x transformers' compiled static-cache path (report.GENERATION_GOALS).
"""
from __future__ import annotations

import torch

from .generation import Case, Family, Models, jobs_for
from .harness import Job
from .impls import Config

GPT2 = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_MEDIUM = dict(GPT2, n_embd=1024, n_layer=24, n_head=16)
GPT2_SMALL_CPU = dict(GPT2, n_embd=256, n_layer=4, n_head=4)
GPT2_TINY_CPU = dict(GPT2, n_embd=64, n_layer=2, n_head=2)
EOS = 50256

FAMILY = Family(group="gpt2", hf_class="GPT2LMHeadModel", hf_auto="AutoModelForCausalLM", hf_config="GPT2Config",
                fl_class="GPT2LMHeadModel", encoder_decoder=False, generate_kwargs={"pad_token_id": EOS})


def setup(cfg: Config) -> list[tuple[str, dict, list[Case]]]:
    """[(config name, transformers GPT2Config fields, cases)]."""
    def cases(name, new, batches, prefill):
        out = [Case(name, B, P, n, "decode") for B, P, n in [(1, 32, new)] + [(b, 32, new) for b in batches]]
        return out + [Case(name, prefill[0], prefill[1], 1, "prefill")]
    if cfg.gpu:
        if cfg.quick:
            return [("gpt2", GPT2, cases("gpt2", 256, [8], (8, 512)))]
        return [(n, f, cases(n, 256, [8, 32], (8, 512))) for n, f in (("gpt2", GPT2), ("gpt2-medium", GPT2_MEDIUM))]
    if cfg.quick:
        return [("gpt2-tiny-cpu", GPT2_TINY_CPU, [Case("gpt2-tiny-cpu", 1, 16, 16, "decode"),
                                                  Case("gpt2-tiny-cpu", 4, 16, 16, "decode"),
                                                  Case("gpt2-tiny-cpu", 2, 64, 1, "prefill")])]
    return [("gpt2-small-cpu", GPT2_SMALL_CPU, [Case("gpt2-small-cpu", 1, 32, 32, "decode"),
                                                Case("gpt2-small-cpu", 8, 32, 16, "decode"),
                                                Case("gpt2-small-cpu", 2, 128, 1, "prefill")])]


def unit_of(case: Case) -> tuple[str, float]:
    """(unit, work per call): ms/token at batch 1 (work = new tokens), else tokens/s (work = new
    tokens of the batch, or prompt tokens for prefill)."""
    if case.kind == "prefill":
        return "tok/s", float(case.batch * case.prompt)
    if case.batch == 1:
        return "ms/token", float(case.new_tokens)
    return "tok/s", float(case.batch * case.new_tokens)


def make_inputs(cfg: Config, case: Case, vocab: int):
    def make():
        ids = torch.randint(0, min(vocab, EOS), (case.batch, case.prompt), device=cfg.device)   # (B, P), no eos
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}                         # (B, P) full
    return make


def fastlayers_loader(folder: str, dtype: torch.dtype, device: torch.device):
    from fastlayers.models import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(folder, dtype=dtype, device=device)


def jobs(cfg: Config) -> list[Job]:
    models = [(Models(FAMILY, name, fields, cfg, lambda *a: fastlayers_loader(*a)), cases)
              for name, fields, cases in setup(cfg)]
    return jobs_for(FAMILY, cfg, models, lambda case, vocab: make_inputs(cfg, case, vocab), unit_of)
