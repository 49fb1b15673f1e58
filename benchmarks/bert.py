"""BERT encoder jobs (`fastlayers bench --models bert`): throughput in sequences/s of
fastlayers.models.BertModel, per requested fastlayers backend, against Hugging Face transformers'
BertModel with the SAME weights: eager attention (the reference row every other row is checked
against, as torch eager is for the op groups), SDPA attention, and torch.compile of the SDPA model
(run last, with the other groups' compile rows).

- Weights: transformers' random init from a fixed seed (MODEL_SEED), then every bias and LayerNorm
  weight/bias moved off its 0 / 1 init, so a model that drops a bias or the norm's affine part fails
  its check. Written once as a local Hugging Face folder (config.json + model.safetensors, in a
  temporary directory) that fastlayers loads with from_pretrained and transformers loads into both of
  its models: nothing is downloaded. Everything in eval mode, in the bench dtype (bf16 on a GPU, fp32
  on CPU).
- Inputs per case: input_ids (B, L) and attention_mask (B, L), both passed to every model. "full":
  every sequence is L tokens (mask all ones). "uniform LO..L": each sequence's length drawn uniformly
  from LO..L (seeded by the runner, like every input set), padded at the right (mask 0, id 0).
- Check: last_hidden_state on the non-padded positions, and pooler_output, against transformers
  eager on the same inputs, with the harness's tolerance for the dtype (harness.TOLERANCE).
- Proof of backend: each fastlayers row runs inside fl.use_backend(b); fl.last_backend("attention")
  is its "ran" column, and linear and layer_norm must report b as well (the whole model switched).
- Shapes: GPU: bert-base (vocab 30522, H 768, 12 layers, 12 heads, FFN 3072, 512 positions), batch
  32 x seq 128 and 512 full, and batch 32 at lengths 16..512 (--quick: 128 full and the padded mix).
  CPU: a small config (H 256, 4 layers, 4 heads, FFN 1024) at batch 4 x seq 64 and 128 full and
  lengths 16..128 -- the same table in seconds (--quick: H 128, 2 layers, batch 2, no compile rows;
  a CPU torch.compile of the model costs ~30 s a case).
The goal (issue 9, on an H200 in bf16; benchmark figures, not tests): fastlayers >= 1.8x transformers
SDPA and >= 1.2x torch.compile of it (report.MODEL_GOALS).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .harness import Job
from .impls import Config, backend_skip, compiled
from .report import COMPILE_IMPL as COMPILE, SDPA_IMPL as SDPA

MODEL_SEED = 0

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
BERT_SMALL_CPU = dict(BERT_BASE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
BERT_TINY_CPU = dict(BERT_BASE, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)

EAGER = "transformers eager"


def setup(cfg: Config) -> tuple[str, dict, list[tuple[int, int, int | None]]]:
    """(config name, transformers BertConfig fields, [(batch, seqlen, shortest length or None = full)])."""
    if cfg.gpu:
        if cfg.quick:
            return "bert-base", BERT_BASE, [(32, 128, None), (32, 512, 16)]
        return "bert-base", BERT_BASE, [(32, 128, None), (32, 512, None), (32, 512, 16)]
    if cfg.quick:
        return "bert-tiny-cpu", BERT_TINY_CPU, [(2, 64, None), (2, 128, None), (2, 128, 16)]
    return "bert-small-cpu", BERT_SMALL_CPU, [(4, 64, None), (4, 128, None), (4, 128, 16)]


class Models:
    """The models of one run, built on first use and shared by every case: one weight set (a local
    Hugging Face folder, kept only while loading) -> transformers eager, transformers sdpa,
    fastlayers. `fastlayers_loader(folder, dtype, device)` is the fastlayers side (tests swap it)."""

    def __init__(self, fields: dict, cfg: Config):
        self.fields, self.cfg = dict(fields), cfg
        self._hf: dict = {}
        self._fl = None
        self._sd = None
        self._hf_config = None

    def _model(self, attn: str):
        """A fresh transformers BertModel (random init) with this attention implementation."""
        import transformers
        config = transformers.BertConfig(**self.fields, architectures=["BertModel"])
        model = transformers.AutoModel.from_config(config, attn_implementation=attn)
        ran = getattr(model.config, "_attn_implementation", None)
        if ran != attn:
            raise RuntimeError(f"transformers built attn_implementation={ran!r}, asked {attn!r}")
        return model

    def state_dict(self) -> dict:
        """The run's weights (float32, CPU), from transformers' init under MODEL_SEED."""
        if self._sd is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(MODEL_SEED)
                model = self._model("eager")
                gen = torch.Generator().manual_seed(MODEL_SEED + 1)
                std = model.config.initializer_range
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "LayerNorm.weight" in name:
                            p.add_(0.1 * torch.randn(p.shape, generator=gen))
                        elif name.endswith("bias"):
                            p.copy_(std * torch.randn(p.shape, generator=gen))
            self._sd = {k: v.contiguous() for k, v in model.state_dict().items()}
            self._hf_config = model.config
        return self._sd

    def transformers(self, attn: str):
        if attn not in self._hf:
            model = self._model(attn)
            model.load_state_dict(self.state_dict())
            self._hf[attn] = model.to(device=self.cfg.device, dtype=self.cfg.dtype).eval()
        return self._hf[attn]

    def fastlayers(self):
        if self._fl is None:
            from safetensors.torch import save_file
            with tempfile.TemporaryDirectory(prefix="fastlayers-bench-bert-") as d:
                save_file(self.state_dict(), str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
                self._hf_config.save_pretrained(d)                          # config.json
                self._fl = fastlayers_loader(d, self.cfg.dtype, self.cfg.device).eval()
        return self._fl


def fastlayers_loader(folder: str, dtype: torch.dtype, device: torch.device):
    from fastlayers.models import BertModel
    return BertModel.from_pretrained(folder, dtype=dtype, device=device)


def _fastlayers_skip() -> str | None:
    try:
        from fastlayers.models import BertModel  # noqa: F401
    except Exception as e:
        return f"not available: fastlayers.models.BertModel not importable ({type(e).__name__}: {e})"
    return None


def _transformers_skip() -> str | None:
    try:
        import transformers  # noqa: F401
        import safetensors  # noqa: F401
    except Exception as e:
        return f"not available: {type(e).__name__}: {e} (pip install transformers safetensors)"
    return None


def _inputs(cfg: Config, B: int, L: int, shortest: int | None, vocab: int):
    def make():
        ids = torch.randint(1, vocab, (B, L), device=cfg.device)                 # (B, L); 0 = [PAD]
        if shortest is None:
            mask = torch.ones(B, L, dtype=torch.long, device=cfg.device)         # (B, L) all tokens
        else:
            lens = torch.randint(shortest, L + 1, (B,), device=cfg.device)       # (B,) uniform LO..L
            mask = (torch.arange(L, device=cfg.device)[None, :] < lens[:, None]).long()   # (B, L)
            ids = ids * mask
        return {"input_ids": ids, "attention_mask": mask}
    return make


def _call(model):
    def call(d):
        out = model(input_ids=d["input_ids"], attention_mask=d["attention_mask"])
        return out.last_hidden_state, out.pooler_output                     # (B, L, H), (B, H)
    return call


def non_padded(d: dict, out):
    """What the check compares: last_hidden_state at the tokens (padded positions hold anything a
    model likes), and pooler_output ([CLS] is never padding)."""
    hidden, pooled = out
    return hidden[d["attention_mask"].bool()], pooled                           # (tokens, H), (B, H)


def _compiled_call(models: Models):
    def build():
        model = models.transformers("sdpa")

        def forward(ids, mask):
            out = model(input_ids=ids, attention_mask=mask)
            return out.last_hidden_state, out.pooler_output
        f = compiled(forward)()
        return lambda d: f(d["input_ids"], d["attention_mask"])
    return build


def jobs(cfg: Config) -> list[Job]:
    name, fields, cases = setup(cfg)
    models = Models(fields, cfg)
    hf_skip = _transformers_skip()
    fl_skip = hf_skip or _fastlayers_skip()
    info = {"model_config": dict(fields, name=name, weights=f"random (transformers init, seed {MODEL_SEED})")}
    out: list[Job] = []
    for B, L, shortest in cases:
        case = {"model": name, "batch": B, "seqlen": L,
                "lengths": "full" if shortest is None else f"uniform {shortest}..{L}"}
        common = dict(group="bert", case=case, variant="fwd", unit="seq/s", work=float(B),
                      inputs_key=("bert", name, B, L, shortest),
                      make_inputs=_inputs(cfg, B, L, shortest, fields["vocab_size"]),
                      check_output=non_padded, info=info)
        for impl, attn, ref in ((EAGER, "eager", True), (SDPA, "sdpa", False)):
            out.append(Job(impl=impl, build=lambda a=attn: _call(models.transformers(a)), is_reference=ref,
                           skip=hf_skip, note=f"transformers BertModel, attn_implementation={attn!r}", **common))
        for backend in cfg.backends:
            out.append(Job(impl=f"fastlayers[{backend}]", build=lambda: _call(models.fastlayers()),
                           context=lambda b=backend: _use_backend(b), skip=fl_skip or backend_skip(backend),
                           fl_op=("attention", "linear", "layer_norm"), fl_backend=backend,
                           note="fastlayers.models.BertModel under fl.use_backend", **common))
        compile_skip = hf_skip
        if not cfg.gpu and cfg.quick:
            compile_skip = compile_skip or "skipped: --quick on CPU (torch.compile of the model costs ~30 s a case)"
        out.append(Job(impl=COMPILE, build=_compiled_call(models), skip=compile_skip,
                       note="torch.compile(dynamic=False) of the transformers sdpa model", **common))
    return out


def _use_backend(backend: str):
    import fastlayers as fl
    use = getattr(fl, "use_backend", None)
    if use is None:
        raise RuntimeError("fastlayers.use_backend is missing: cannot switch the model's backend")
    return use(backend)

