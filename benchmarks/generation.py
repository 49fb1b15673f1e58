"""Shared pieces of the generation groups (`fastlayers bench --models gpt2,bart`; gpt2.py, bart.py):
one random weight set per model shared by both libraries, the generate calls of every row, the
check of the generated ids, and (GPU) where a decode step's time goes.

Rows of a case (one prompt batch, one search): "transformers generate" (dynamic cache, the
reference row), "torch.compile (transformers static cache)" (transformers' own recipe:
cache_implementation="static" with a CompileConfig(fullgraph=True), i.e. reduce-overhead CUDA graphs
of the decode step, compiled by generate itself; run last with the other compile rows), and
"fastlayers[<backend>]" per requested backend under fl.use_backend (CUDA graph decode, the default
on a GPU), plus on a GPU "fastlayers[<backend>] no graph" (use_cuda_graph=False) for one backend.
Every call generates exactly the asked number of tokens: min_new_tokens = max_new_tokens on both
sides (the end-of-sequence token can never win), and the check counts missing tokens as wrong.

The check (harness: what check_output returns is compared with the reference row's; the reference
returns 0, so a row passes only when its value is exactly 0; `error` = the fraction of the
generated tokens, or beams, that fail):
- CPU float32 ("exact"): the row's ids equal the reference's, token for token. Both libraries
  compute in float32 and greedy/beam decisions only flip on near-ties (~1e-6 of a logit).
- GPU / half precision ("near-argmax", "beam score"): bf16 rounding differs between any two
  implementations (other GEMM tilings, fused adds), and random weights give flat next-token
  distributions, so exact ids diverge within tens of tokens even between two correct bf16
  implementations -- transformers' own eager and compiled paths included. The fair test scores the
  row's tokens with the reference model itself (one teacher-forced transformers forward over the
  row's sequences), each against the spread of that step's distribution (so any logit scale or
  offset reads the same):
  greedy: every generated token's deficit = (best logit - its logit) / (best logit - mean logit)
  must be <= DELTA[dtype] (0 for the argmax, ~1 for a token of average rank);
  beam search: each input's returned beam's shortfall = (mean log-prob of the reference's beam -
  of this beam) / (the reference's beam's - a random token's) must be <= DELTA[dtype] (0: as good,
  ~1: no better than chance).
  A correct bf16 row only departs from the reference's argmax at near-ties (deficits of a few
  percent); a wrong model (a sign error, a stale cache, a dropped layer) picks tokens the reference
  ranks far down. A small perturbation that keeps the tokens plausible passes: this is a check of
  the path, not a parity test (tests/test_gpt2.py and test_bart.py compare logits). The
  reference row records its own deficits (its incremental decode against its full forward): the
  check's noise floor on this card.
Each row's JSON has "generation": the check's mode and numbers (first_divergence: index of the
first new token where any row's ids differ from the reference's, null when none; not_argmax: tokens
that are not the reference model's argmax), and for
fastlayers decode rows on a GPU "gpu_busy_ms_per_step" (the kernels' time in one profiled
generate call, torch.profiler, divided by the steps) -- report.py sets the idle time and the
weights' bandwidth floor beside it. The fields are filled while the row runs its check (the harness
copies `info` into the row before running it, and this dict is shared).
"""
from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass, field

import torch

from .bert import _use_backend
from .harness import Job, TOLERANCE
from .impls import Config, backend_skip
from .report import GEN_COMPILE_IMPL as COMPILE, GEN_REFERENCE_IMPL as REFERENCE

MODEL_SEED = 0
# near-argmax / beam score checks: the largest deficit (greedy) or shortfall (beam) allowed, as a
# fraction of the step's spread (module doc); 2x the harness's output tolerance for the dtype
DELTA = {torch.bfloat16: 2 * TOLERANCE[torch.bfloat16], torch.float16: 2 * TOLERANCE[torch.float16],
         torch.float32: 1e-2}


@dataclass
class Case:
    model: str
    batch: int
    prompt: int            # prompt tokens (decoder-only) or encoder input tokens (encoder-decoder)
    new_tokens: int
    kind: str              # "decode" | "prefill"
    beams: int = 1

    def as_dict(self) -> dict:
        return {"model": self.model, "batch": self.batch, "prompt": self.prompt, "new_tokens": self.new_tokens,
                "search": "greedy" if self.beams == 1 else f"beam {self.beams}"}


@dataclass
class Family:
    """What differs between the generation groups."""
    group: str                     # "gpt2" | "bart"
    hf_class: str                  # transformers model class
    hf_auto: str                   # the transformers Auto class that builds it from a config
    hf_config: str                 # transformers config class
    fl_class: str                  # fastlayers.models class
    encoder_decoder: bool
    generate_kwargs: dict = field(default_factory=dict)   # both libraries, every call


class Models:
    """One model's weights and both libraries' models, built on first use: transformers' random
    init under MODEL_SEED, every bias and LayerNorm weight moved off its 0 / 1 init (a model that
    drops one fails its check), saved once as a local Hugging Face folder (save_pretrained, kept
    only while fastlayers loads it), both models in eval mode in the bench dtype. The transformers
    model serves the reference rows, the compile rows and the near-argmax check."""

    def __init__(self, family: Family, name: str, fields: dict, cfg: Config, loader):
        self.family, self.name, self.fields, self.cfg, self.loader = family, name, dict(fields), cfg, loader
        self._hf = self._fl = None

    def _build(self) -> None:
        import transformers
        config = getattr(transformers, self.family.hf_config)(**self.fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MODEL_SEED)
            model = getattr(transformers, self.family.hf_auto).from_config(config, attn_implementation="sdpa")
        if type(model).__name__ != self.family.hf_class:
            raise RuntimeError(f"transformers built {type(model).__name__}, expected {self.family.hf_class}")
        ran = getattr(model.config, "_attn_implementation", None)
        if ran != "sdpa":
            raise RuntimeError(f"transformers built attn_implementation={ran!r}, asked 'sdpa'")
        gen = torch.Generator().manual_seed(MODEL_SEED + 1)
        std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(std * torch.randn(p.shape, generator=gen))
                elif p.dim() == 1 and ("ln" in name or "norm" in name):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
            for name, b in model.named_buffers():
                if name.endswith("final_logits_bias"):
                    b.copy_(std * torch.randn(b.shape, generator=gen))
        model.eval()
        with tempfile.TemporaryDirectory(prefix=f"fastlayers-bench-{self.family.group}-") as d:
            model.save_pretrained(d)
            self._fl = self.loader(d, self.cfg.dtype, self.cfg.device).eval()
        self._hf = model.to(device=self.cfg.device, dtype=self.cfg.dtype)

    def transformers(self):
        if self._hf is None:
            self._build()
        return self._hf

    def fastlayers(self):
        if self._fl is None:
            self._build()
        return self._fl

    def weight_bytes(self) -> int:
        """Bytes of the fastlayers model's parameters (tied embeddings once): what a decode step reads."""
        m = self.fastlayers()
        return sum(p.numel() * p.element_size() for p in m.parameters())


def transformers_skip() -> str | None:
    try:
        import transformers  # noqa: F401
        import safetensors  # noqa: F401
    except Exception as e:
        return f"not available: {type(e).__name__}: {e} (pip install transformers safetensors)"
    return None


def fastlayers_skip(cls: str) -> str | None:
    try:
        import fastlayers.models as m
        getattr(m, cls)
    except Exception as e:
        return f"not available: fastlayers.models.{cls} not importable ({type(e).__name__}: {e})"
    return None


def compile_support(beams: int) -> str | None:
    """None when the installed transformers compiles generate's decode step for this search, else why
    not (read from its source: generate compiles in the decoding loops that call get_compiled_call)."""
    try:
        from transformers import CompileConfig  # noqa: F401
        from transformers.generation.utils import GenerationMixin
    except Exception as e:
        return f"transformers has no CompileConfig / GenerationMixin ({type(e).__name__}: {e})"
    loop = "_beam_search" if beams > 1 else "_sample"
    import transformers
    try:
        src = inspect.getsource(getattr(GenerationMixin, loop))
    except Exception as e:  # no source to read: try it, the row will say what happened
        return None if hasattr(GenerationMixin, loop) else f"GenerationMixin.{loop} missing ({type(e).__name__})"
    if "get_compiled_call" not in src:
        return (f"transformers {transformers.__version__} compiles generate's forward for greedy/sampling only: "
                f"GenerationMixin.{loop} never calls get_compiled_call, so beam search runs eager even with "
                f"cache_implementation='static'")
    return None


# ---------------------------------------------------------------------------------------------
# calls

def generate_kwargs(family: Family, case: Case) -> dict:
    n = case.new_tokens
    return dict(family.generate_kwargs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=case.beams)


def reference_call(models: Models, case: Case):
    model, kw = models.transformers(), generate_kwargs(models.family, case)

    def call(d):
        return model.generate(d["input_ids"], attention_mask=d["attention_mask"], **kw)
    return call


def compiled_call(models: Models, case: Case):
    """transformers' recipe: static cache, and generate compiles the decode step itself (mode
    "reduce-overhead", fullgraph=True). Dynamo's caches are cleared first (one compile per case, never
    the recompile limit's silent eager fallback)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig
    model, kw = models.transformers(), generate_kwargs(models.family, case)
    torch._dynamo.reset()
    counters.clear()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    state = {"checked": False}
    compile_config = CompileConfig(fullgraph=True)

    def call(d):
        out = model.generate(d["input_ids"], attention_mask=d["attention_mask"], cache_implementation="static",
                             compile_config=compile_config, **kw)
        if not state["checked"]:
            state["checked"] = True
            if not (getattr(model, "_compiled_call", None) is not None or counters["stats"]["unique_graphs"]):
                raise RuntimeError("transformers did not compile the forward (generate's "
                                   "_valid_auto_compile_criteria refused)")
        return out
    return call


def fastlayers_call(models: Models, case: Case, use_cuda_graph: bool | None):
    model, kw = models.fastlayers(), generate_kwargs(models.family, case)
    if use_cuda_graph is not None:
        kw["use_cuda_graph"] = use_cuda_graph

    def call(d):
        return model.generate(d["input_ids"], attention_mask=d["attention_mask"], **kw)
    return call


# ---------------------------------------------------------------------------------------------
# the check

class IdsCheck:
    """The check of one case's rows. The reference row's check records its ids (and returns 0);
    every other row's returns the fraction of its tokens (or beams) that fail, and fills its
    `generation` details. Exact on CPU in float32, near-argmax elsewhere (module doc)."""

    def __init__(self, models: Models, case: Case, cfg: Config):
        self.models, self.case, self.cfg = models, case, cfg
        self.exact = cfg.device.type == "cpu" and cfg.dtype == torch.float32
        self.delta = None if self.exact else DELTA.get(cfg.dtype, DELTA[torch.float32])
        self._ref = None          # (input_ids on CPU, reference ids on CPU)
        self._ref_score = None    # beam search, near mode: (reference beams', chance) mean log-probabilities

    def mode(self) -> str:
        if self.exact:
            return "exact ids"
        return "beam score" if self.case.beams > 1 else "near-argmax"

    def _start(self) -> int:
        """Index of the first generated token in a returned sequence."""
        return 1 if self.models.family.encoder_decoder else self.case.prompt

    def view(self, details: dict, reference: bool):
        def check(inputs: dict, out):
            ids = out if isinstance(out, torch.Tensor) else out.sequences
            return self._check(inputs, ids.detach(), details, reference)
        return check

    def _check(self, inputs: dict, ids: torch.Tensor, details: dict, reference: bool) -> torch.Tensor:
        c, s = self.case, self._start()
        want = (c.batch, s + c.new_tokens)
        beams_scored = c.beams > 1 and not self.exact
        details.update(check=self.mode(), delta=self.delta, shape=list(ids.shape),
                       compared=c.batch if beams_scored else c.batch * c.new_tokens)
        ids_cpu, inp_cpu = ids.cpu(), inputs["input_ids"].cpu()
        if reference:
            if tuple(ids.shape) != want:
                raise RuntimeError(f"the reference generated shape {tuple(ids.shape)}, expected {want}: its "
                                   f"token count is not fixed (min_new_tokens ignored?)")
            self._ref, self._ref_score = (inp_cpu, ids_cpu), None
            if not self.exact:       # the reference scored by its own model: the check's noise floor
                details.update(self._near(inputs, ids, ids))
            details["failed"] = 0
            return torch.zeros(1, dtype=torch.float64)
        if self._ref is None or not torch.equal(self._ref[0], inp_cpu):
            raise RuntimeError("the reference row's ids for these inputs were not recorded")
        if tuple(ids.shape) != want:      # every token counts as failed: the count is part of the contract
            details.update(failed=details["compared"], first_divergence=None,
                           wrong_shape=f"generated {tuple(ids.shape)}, expected {want}")
            return torch.ones(1, dtype=torch.float64)
        ref = self._ref[1]
        differ = ids_cpu[:, s:] != ref[:, s:]                                                  # (B, N)
        cols = differ.any(0).nonzero()
        details["first_divergence"] = int(cols[0]) if len(cols) else None
        details["equal_tokens"] = int((~differ).sum())
        if self.exact:
            failed = int(differ.sum())
        else:
            near = self._near(inputs, ids, ref.to(ids.device))
            details.update(near)
            failed = near["failed_beams" if beams_scored else "failed_tokens"]
        details["failed"] = failed
        return torch.tensor([failed / details["compared"]], dtype=torch.float64)

    @torch.no_grad()
    def _log_probs(self, inputs: dict, seqs: torch.Tensor):
        """(logits (B, n, V) float32 of the reference model at each generated position, chosen (B, n))
        in chunks of rows (a (B, T, V) float32 tensor of 32 x 288 x 50257 would be 1.9 GB)."""
        model, s = self.models.transformers(), self._start()
        V = model.config.vocab_size
        rows = max(1, (1 << 28) // max(1, seqs.shape[1] * V))
        for i in range(0, seqs.shape[0], rows):
            seq = seqs[i:i + rows]
            if self.models.family.encoder_decoder:
                out = model(input_ids=inputs["input_ids"][i:i + rows],
                            attention_mask=inputs["attention_mask"][i:i + rows], decoder_input_ids=seq[:, :-1])
                logits = out.logits[:, s - 1:].float()                                  # predicts seq[:, s:]
            else:
                mask = torch.ones_like(seq[:, :-1])
                logits = model(input_ids=seq[:, :-1], attention_mask=mask).logits[:, s - 1:].float()
            yield logits, seq[:, s:]

    def _near(self, inputs: dict, seqs: torch.Tensor, ref: torch.Tensor) -> dict:
        """Scores of seqs' generated tokens under the reference model, each measured against the spread
        of that step's distribution, so the test reads the same for any logit scale or offset.
        Greedy: per token, deficit = (best logit - chosen's) / (best logit - mean logit): 0 for the
        argmax, ~1 for a token of average rank, ~2 for the worst. Beam: per input, shortfall = (mean
        log-prob of ref's beam - of seqs' beam) / (ref's beam's - a random token's mean log-prob): 0
        for an equally good beam, ~1 for one no better than chance."""
        if self.case.beams > 1:
            def scores(x):
                lp_beam, lp_chance = [], []
                for logits, chosen in self._log_probs(inputs, x):
                    lp = torch.log_softmax(logits, -1)                                           # (b, n, V)
                    lp_beam.append(lp.gather(-1, chosen[..., None])[..., 0].mean(-1))             # (b,)
                    lp_chance.append(lp.mean(-1).mean(-1))                                        # (b,)
                return torch.cat(lp_beam), torch.cat(lp_chance)
            mine, mine_chance = scores(seqs)
            if seqs is ref:                            # the reference row: its own scores are the yardstick
                self._ref_score = (mine, mine_chance)
            elif self._ref_score is None:
                self._ref_score = scores(ref)
            theirs, chance = self._ref_score
            short = (theirs - mine) / (theirs - chance).clamp_min(1e-6)                           # (B,)
            return {"failed_beams": int((short > self.delta).sum()), "max_score_shortfall": float(short.max()),
                    "mean_log_prob": float(mine.mean()), "reference_mean_log_prob": float(theirs.mean()),
                    "chance_mean_log_prob": float(chance.mean())}
        worst, failed, not_argmax = 0.0, 0, 0
        for logits, chosen in self._log_probs(inputs, seqs):
            best = logits.max(-1).values                                                          # (b, n)
            spread = (best - logits.mean(-1)).clamp_min(1e-6)
            deficit = (best - logits.gather(-1, chosen[..., None])[..., 0]) / spread
            worst = max(worst, float(deficit.max()))
            failed += int((deficit > self.delta).sum())
            not_argmax += int((deficit > 0).sum())
        return {"failed_tokens": failed, "max_deficit": worst, "not_argmax": not_argmax}


# ---------------------------------------------------------------------------------------------
# where a decode step's time goes (GPU)

def profile_gpu_busy(call, inputs: dict, steps: int) -> dict:
    """One more generate call under torch.profiler (CUDA activity): the kernels' busy time (union of
    their intervals) per decode step. The call's wall time under the profiler is recorded but not
    used: report.py divides the row's timed figure instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        call(inputs)
        end.record()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not spans:
        return {"gpu_busy_ms_per_step": None, "profile_note": "the profiler recorded no kernels"}
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy += hi - lo
            lo, hi = a, b
        else:
            hi = max(hi, b)
    busy += hi - lo                                                                      # microseconds
    return {"gpu_busy_ms_per_step": busy / 1e3 / steps, "profiled_kernels": len(spans),
            "profiled_wall_ms": float(start.elapsed_time(end))}


# ---------------------------------------------------------------------------------------------
# jobs

def jobs_for(family: Family, cfg: Config, models: list[tuple[Models, list[Case]]], make_inputs, unit_of) -> list[Job]:
    """The rows of every (model, case): reference, fastlayers per backend (+ one "no graph" row per
    GPU decode case), then the compile row. make_inputs(case, vocab) -> the harness's input maker;
    unit_of(case) -> (unit, work)."""
    hf_skip = transformers_skip()
    fl_skip = hf_skip or fastlayers_skip(family.fl_class)
    no_graph_backend = _no_graph_backend(cfg)
    out: list[Job] = []
    for m, cases in models:
        model_info = dict(m.fields, name=m.name, weights=f"random (transformers init, seed {MODEL_SEED}; biases and "
                                                          f"norms perturbed)")
        for case in cases:
            check = IdsCheck(m, case, cfg)
            unit, work = unit_of(case)
            decode_ops = ("attention", "linear", "layer_norm")
            if case.kind == "decode" or family.encoder_decoder:
                decode_ops = ("attention", "attention_with_kvcache", "linear", "layer_norm")
            common = dict(group=family.group, case=case.as_dict(), variant=case.kind, unit=unit, work=work,
                          inputs_key=(family.group, m.name, case.batch, case.prompt),
                          make_inputs=make_inputs(case, m.fields["vocab_size"]))
            kw = generate_kwargs(family, case)
            search = f"beam search num_beams={case.beams}" if case.beams > 1 else "greedy"

            def info(extra: dict | None = None):
                d = {"model_config": model_info, "generation": {}, "generate_kwargs": {k: v for k, v in kw.items()}}
                d.update(extra or {})
                return d

            i = info()
            out.append(Job(impl=REFERENCE, build=lambda m=m, c=case: reference_call(m, c), is_reference=True,
                           skip=hf_skip, check_output=check.view(i["generation"], True), info=i,
                           note=f"transformers {family.hf_class}.generate, dynamic cache, sdpa, {search}", **common))
            for backend in cfg.backends:
                graphs = [None] + ([False] if cfg.gpu and case.kind == "decode" and backend == no_graph_backend else [])
                for graph in graphs:
                    i = info()
                    impl = f"fastlayers[{backend}]" + (" no graph" if graph is False else "")
                    profile = cfg.gpu and case.kind == "decode"
                    out.append(Job(
                        impl=impl, build=_fl_build(m, case, graph, i["generation"] if profile else None),
                        context=lambda b=backend: _use_backend(b), skip=fl_skip or backend_skip(backend),
                        fl_op=decode_ops, fl_backend=backend, check_output=check.view(i["generation"], False), info=i,
                        note=f"fastlayers.models.{family.fl_class}.generate under fl.use_backend, {search}, "
                             f"use_cuda_graph={'default (True on CUDA)' if graph is None else graph}", **common))
            i = info()
            skip = hf_skip
            if not cfg.gpu:
                skip = skip or ("skipped: CPU run (transformers' generate compiles on CUDA only; forced: ~50 s a "
                                "shape)")
            if skip is None:
                why = compile_support(case.beams)
                skip = f"unsupported: {why}" if why else None
            out.append(Job(impl=COMPILE, build=lambda m=m, c=case: compiled_call(m, c), skip=skip,
                           check_output=check.view(i["generation"], False), info=i,
                           note="transformers generate, cache_implementation='static', "
                                "compile_config=CompileConfig(fullgraph=True) (mode reduce-overhead)", **common))
    return out


def _fl_build(m: Models, case: Case, graph, profile_into: dict | None):
    """The fastlayers row's call; with profile_into (GPU decode rows), its first call is followed by
    one profiled call whose kernel time lands in the row's details (never timed)."""
    def build():
        call = fastlayers_call(m, case, graph)
        if profile_into is None:
            return call
        state = {"first": True}

        def first_then_profile(d):
            out = call(d)
            if state["first"]:
                state["first"] = False
                try:
                    profile_into.update(profile_gpu_busy(call, d, case.new_tokens))
                except Exception as e:  # the profile is extra information: its failure never fails the row
                    profile_into.update(gpu_busy_ms_per_step=None, profile_note=f"{type(e).__name__}: {e}"[:200])
                profile_into["weight_bytes"] = m.weight_bytes()
            return out
        return first_then_profile
    return build


def _no_graph_backend(cfg: Config) -> str | None:
    """The backend of the "no graph" rows: cuda when asked for and available, else the first available."""
    order = sorted(cfg.backends, key=lambda b: b != "cuda")
    for b in order:
        if backend_skip(b) is None:
            return b
    return order[0] if order else None
