"""fl.patch(model) / fl.unpatch(model): fastlayers inside a Hugging Face transformers model, in place.

What it guarantees, and how (transformers' own extension points; no upstream forward is copied):
  - attention: a function registered in transformers' `AttentionInterface` and selected with
    `model.set_attn_implementation("fastlayers")`, plus a mask function registered under the same
    name in `AttentionMaskInterface` (without one transformers hands a custom implementation
    attention_mask=None and padding is silently ignored). The mask function returns a (B, Lk) bool
    key-padding vector (True = attend) or None -- never a 4-D mask -- whenever the pattern is
    causal or bidirectional attention plus padding; the causal part comes from module.is_causal,
    bottom-right aligned as fl.attention's (exact without a cache and with DynamicCache, where
    q_offset = Lk - Lq; a StaticCache's empty slots are folded into the padding when decoding and
    cut off -- a shorter mask, the keys sliced to it -- in its prefill). Anything else (packed sequences, sliding windows, custom mask functions, a user's
    4-D mask, grouped-query heads, softcap...) runs transformers' own sdpa for that call, and is
    counted (attention_stats()) and logged once per reason: never silently wrong.
  - norms and MLPs: module instances swapped from a small table per family (below); the new
    modules hold the SAME Parameter objects, so names, state_dict, optimizer state and
    save_pretrained are unchanged. A fused pair act(linear(x)) is fused only when the parent
    class's installed forward reads exactly that (checked in its source at patch time), so a
    transformers release that changes the forward is caught, not silently mis-patched.
  - fl.unpatch restores the original module objects (re-sharing whatever parameters the patched
    ones hold by then) and the original attn_implementation.
"""
from __future__ import annotations

import collections
import functools
import inspect
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as fl_nn
from .backends import BACKENDS
from .ops._common import host_readable
from .ops.linear import linear

logger = logging.getLogger("fastlayers.patch")

# attn_implementation name per backend argument: the name carries the backend, so the globally
# registered function needs no per-model state.
ATTN_NAMES = {None: "fastlayers", "torch": "fastlayers_torch", "triton": "fastlayers_triton",
              "cuda": "fastlayers_cuda"}


@dataclass(frozen=True)
class _Family:
    name: str
    model_type: str
    fused: dict        # class name -> (linear attribute, activation attribute): act(linear(x)) in its forward
    plain: dict        # class name -> linear attributes run on fl.linear as they are (no epilogue)


# The table. Every nn.LayerNorm of a listed model becomes fl.nn.LayerNorm; attention goes through
# the interface. RoBERTa's LM head applies gelu as a function (not fusable): its norm is swapped only.
FAMILIES = (
    _Family("BERT", "bert", {"BertIntermediate": ("dense", "intermediate_act_fn"),
                             "BertPredictionHeadTransform": ("dense", "transform_act_fn")},
            {"BertOutput": ("dense",)}),
    _Family("RoBERTa", "roberta", {"RobertaIntermediate": ("dense", "intermediate_act_fn")},
            {"RobertaOutput": ("dense",)}),
    _Family("GPT-2", "gpt2", {"GPT2MLP": ("c_fc", "act")}, {"GPT2MLP": ("c_proj",)}),
    _Family("BART", "bart",
            {"BartEncoderLayer": ("fc1", "activation_fn"), "BartDecoderLayer": ("fc1", "activation_fn")},
            {"BartEncoderLayer": ("fc2",), "BartDecoderLayer": ("fc2",)}),
)


def supported_families() -> str:
    return ", ".join(f"{f.name} (model_type {f.model_type!r})" for f in FAMILIES)


def _pkg():
    """The fastlayers package, looked up per call so that fl.attention can be wrapped (tests' spies)."""
    return sys.modules[__package__]


# ----------------------------------------------------------------------------- attention: counters
_STATS: collections.Counter = collections.Counter()
_WARNED: set = set()


def attention_stats() -> dict:
    """{"fastlayers": calls that ran fl.attention, "sdpa: <reason>": calls that ran transformers' sdpa,
    "mask: <reason>": masks built for sdpa}, since import or reset_attention_stats(). Not counted
    while torch.compile traces."""
    return dict(_STATS)


def reset_attention_stats() -> None:
    _STATS.clear()


def _note(key: str) -> None:
    if torch.compiler.is_compiling():
        return
    _STATS[key] += 1
    if not key.startswith("fastlayers") and key not in _WARNED:
        _WARNED.add(key)
        logger.warning("fastlayers.patch: %s -- this runs transformers' sdpa attention instead of fl.attention", key)


# ----------------------------------------------------------------------------- attention: the mask
def _key_padding(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, config, device):
    """(mask, None) with mask a (B, Lk') bool tensor or None, or (None, reason) when the pattern is not
    causal / bidirectional attention + padding. Lk' < Lk means: attend only the first Lk' keys (a
    static cache's prefill, whose later slots are empty)."""
    from transformers import masking_utils as mu
    causal = mask_function is mu.causal_mask_function
    if not causal and mask_function is not mu.bidirectional_mask_function:
        return None, "a mask pattern other than causal/bidirectional + padding (packed sequences, sliding " \
                     "window, or a custom mask function)"
    if not causal and getattr(config, "is_causal", True) is False:
        return None, "config.is_causal=False (bidirectional masks for causal modules)"
    if not isinstance(kv_offset, int):
        return None, "a tensor kv_offset"
    pad = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
            return None, "an attention_mask that is not a 2-D padding mask"
        pad = attention_mask.to(device=device, dtype=torch.bool)
        short = kv_offset + kv_length - pad.shape[-1]
        if short > 0:  # as transformers' prepare_padding_mask: missing slots are not attended
            pad = F.pad(pad, (0, short), value=False)
        pad = pad[:, kv_offset:kv_offset + kv_length]                               # (B, Lk)
        if pad.shape[0] != batch_size:
            pad = pad.expand(batch_size, -1)
    keys = kv_length
    if causal:
        shift = q_offset - kv_offset  # query i sees key j iff j <= i + shift; fl.attention: shift = Lk - Lq
        if q_length == 1:
            if isinstance(shift, Tensor) or shift < kv_length - 1:  # fold "j <= shift" into the padding
                within = torch.arange(kv_length, device=device)
                within = (within <= shift)[None, :].expand(batch_size, -1)
                pad = within if pad is None else pad & within
        elif q_length > 1:
            if isinstance(shift, Tensor):
                if not host_readable(shift):
                    return None, "a tensor query offset under torch.compile (static cache prefill)"
                shift = int(shift)
            if 0 <= shift < kv_length - q_length:  # static cache prefill: the slots past the last query are empty
                keys = shift + q_length
                pad = pad[:, :keys] if pad is not None else torch.ones(batch_size, keys, dtype=torch.bool,
                                                                        device=device)
            elif shift != kv_length - q_length:
                return None, f"a causal mask not bottom-right aligned (offset {shift}, Lq {q_length}, Lk {kv_length})"
    if pad is not None and keys == kv_length and host_readable(pad) and bool(pad.all()):
        pad = None  # nothing padded: no mask at all
    return pad, None


def fastlayers_mask(**kw):
    """The AttentionMaskInterface entry (transformers calls it with keywords only): a (B, Lk) bool
    key-padding mask (True = attend) or None; else (counted, logged) the 4-D bool mask transformers'
    sdpa would get. Takes both mask APIs: (q_length, q_offset) since transformers 5.x, and the
    cache_position (the query positions) that transformers 5.0 passed instead."""
    from transformers import masking_utils as mu
    if "q_length" in kw:
        q_length, q_offset = kw["q_length"], kw.get("q_offset", 0)
    else:
        pos = kw["cache_position"]                                                  # (Lq,) absolute positions
        q_length, q_offset = pos.shape[0], (pos[0] if pos.shape[0] else 0)
    mask_function = kw.get("mask_function", mu.causal_mask_function)
    device = torch.device(kw.get("device", kw["cache_position"].device if "cache_position" in kw else "cpu"))
    mask, reason = _key_padding(kw["batch_size"], q_length, kw["kv_length"], q_offset, kw.get("kv_offset", 0),
                                mask_function, kw.get("attention_mask"), kw.get("config"), device)
    if reason is None:
        return mask
    _note(f"mask: {reason}")
    return mu.sdpa_mask(**{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})  # never None


# ----------------------------------------------------------------------------- attention: the function
_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias")


def _dense_mask(kpm, causal, B, Lq, Lk, device):
    """(B, 1, Lq, Lk) bool (or None) with fl.attention's semantics, for the sdpa fallback."""
    allowed = None
    if causal and Lq > 1:
        j, i = torch.arange(Lk, device=device), torch.arange(Lq, device=device)
        allowed = (j[None, :] <= i[:, None] + (Lk - Lq))[None, None]
    if kpm is not None:
        pad = kpm[:, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


def _attention_fn(backend):
    def fastlayers_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                             dropout: float = 0.0, is_causal: Optional[bool] = None, **kwargs):
        """transformers' attention interface: query, key, value (B, H, L, D) -> ((B, Lq, H, D), None)."""
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        kpm, reason = attention_mask, None
        if kpm is not None:
            if not isinstance(kpm, Tensor):
                reason = f"an attention mask of type {type(kpm).__name__}"
            elif kpm.dim() == 4:
                # A complete (prepared) mask: transformers applies no causal part on top of it.
                if kpm.dtype == torch.bool and kpm.shape[1] == 1 and kpm.shape[2] == 1:
                    kpm, causal = kpm[:, 0, 0, :].expand(query.shape[0], -1), False  # (B, Lk): padding only
                else:
                    reason = "a 4-D attention mask"
            elif kpm.dim() != 2 or kpm.dtype != torch.bool:
                raise TypeError(f"fastlayers attention: expected the (B, Lk) bool mask of the 'fastlayers' mask "
                                f"function, got {kpm.dtype} of shape {tuple(kpm.shape)}")
        if reason is None:
            if key.shape[1] != query.shape[1]:
                reason = "grouped-query attention (fewer key/value heads)"
            elif key.shape[-1] != query.shape[-1] or value.shape[-1] != key.shape[-1]:
                reason = "different q/k/v head dims"
            elif not (query.dtype == key.dtype == value.dtype):
                reason = "mixed q/k/v dtypes"
            else:
                reason = next((f"{k}=" for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None), None)
        if reason is not None:
            return _sdpa(reason, module, query, key, value, kpm, causal, scaling, dropout, kwargs)
        if kpm is not None and kpm.shape[-1] != key.shape[2]:
            if kpm.shape[-1] > key.shape[2]:
                raise ValueError(f"fastlayers attention: mask over {kpm.shape[-1]} keys, got {key.shape[2]} keys")
            key, value = key[:, :, :kpm.shape[-1]], value[:, :, :kpm.shape[-1]]  # a static cache's used slots
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, D) views
        out = _pkg().attention(q, k, v, causal=causal, softmax_scale=scaling, key_padding_mask=kpm,
                               dropout_p=float(dropout) if module.training else 0.0, backend=backend)
        _note("fastlayers")
        return out, None                                                            # (B, Lq, H, D)
    fastlayers_attention.__qualname__ = fastlayers_attention.__name__ = ATTN_NAMES[backend] + "_attention"
    return fastlayers_attention


def _sdpa(reason, module, query, key, value, mask, causal, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    _note(f"sdpa: {reason}")
    if isinstance(mask, Tensor) and mask.dim() == 2:  # our compact mask -> the dense mask it stands for
        B, Lq, Lk = query.shape[0], query.shape[2], mask.shape[-1]
        key, value = key[:, :, :Lk], value[:, :, :Lk]
        mask = _dense_mask(mask, causal, B, Lq, Lk, query.device)
    elif mask is None and causal and query.shape[2] > 1 and key.shape[2] != query.shape[2]:
        mask = _dense_mask(None, True, query.shape[0], query.shape[2], key.shape[2], query.device)  # bottom-right
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout if module.training else 0.0,
                                  scaling=scaling, is_causal=causal, **kwargs)


@functools.lru_cache(maxsize=None)
def _register() -> None:
    """Registers every fastlayers name in both interfaces (once; class-level, so every model sees it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    for backend, name in ATTN_NAMES.items():
        AttentionInterface.register(name, _attention_fn(backend))
        AttentionMaskInterface.register(name, fastlayers_mask)


# ----------------------------------------------------------------------------- module swaps
def _activations() -> dict:
    """Activation module type -> fl.linear activation (exact types; the same math, not approximations)."""
    from transformers import activations as a
    table = {nn.ReLU: "relu", a.GELUActivation: "gelu", a.NewGELUActivation: "gelu_tanh"}
    for name in ("GELUTanh", "PytorchGELUTanh"):
        if hasattr(a, name):
            table[getattr(a, name)] = "gelu_tanh"
    return table


def _fl_activation(act) -> Optional[str]:
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is nn.ReLU and act.inplace:
        return None
    return _activations().get(type(act))


@functools.lru_cache(maxsize=None)
def _conv1d_cls():
    from transformers.pytorch_utils import Conv1D

    class FastConv1D(Conv1D):
        """transformers' Conv1D (weight (in, out) = (nx, nf), kept as it is and shared) on fl.linear, which
        gets `weight.t()`, a view. The "torch" backend (CPU) passes it to F.linear as it is; the kernel
        backends copy it per call (one (in, out) copy, the op's contiguous-last-dim policy)."""

        def __init__(self, nf, nx, activation=None, *, backend=None):
            super().__init__(nf, nx)
            self.activation, self.backend = activation, backend

        def forward(self, x: Tensor) -> Tensor:
            return linear(x, self.weight.t(), self.bias, activation=self.activation, backend=self.backend)

        def extra_repr(self) -> str:
            return super().extra_repr() + f", activation={self.activation}"
    return FastConv1D


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__ == "transformers.pytorch_utils"


def _linear_like(m) -> bool:
    return type(m) is nn.Linear or _is_conv1d(m)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """new takes old's parameters (the same objects), hooks (the same dicts), mode and extra attributes
    (public ones, and transformers' _is_hf_initialized)."""
    for name, p in old._parameters.items():
        setattr(new, name, p)
    for name in _HOOK_DICTS:
        if name in old.__dict__:
            object.__setattr__(new, name, old.__dict__[name])
    for k, v in old.__dict__.items():  # a user's attributes; never a private one such as _compiled_call_impl
        if k not in new.__dict__ and (not k.startswith("_") or k == "_is_hf_initialized"):
            new.__dict__[k] = v
    new.train(old.training)
    return new


def _fast_linear(old, activation, backend) -> nn.Module:
    with torch.device("meta"):  # parameters come from `old`: nothing allocated
        if _is_conv1d(old):
            new = _conv1d_cls()(old.nf, old.nx, activation, backend=backend)
        else:
            new = fl_nn.Linear(old.in_features, old.out_features, old.bias is not None, activation, backend=backend)
    return _adopt(new, old)


def _fast_layer_norm(old, backend) -> nn.Module:
    with torch.device("meta"):
        new = fl_nn.LayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                              bias=old.bias is not None, backend=backend)
    return _adopt(new, old)


@functools.lru_cache(maxsize=None)
def _forward_source(cls) -> Optional[str]:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


def _reads_act_of_linear(cls, lin: str, act: str) -> bool:
    """cls.forward calls self.<lin> once and self.<act> once, on the linear's output and nothing else:
    `self.act(self.lin(x))`, or `h = self.lin(h)` directly followed by `h = self.act(h)`."""
    src = _forward_source(cls)
    if src is None:
        return False
    if len(re.findall(rf"self\.{lin}\(", src)) != 1 or len(re.findall(rf"self\.{act}\(", src)) != 1:
        return False
    nested = re.search(rf"self\.{act}\(\s*self\.{lin}\([^()]*\)\s*\)", src)
    chained = re.search(rf"(\w+)\s*=\s*self\.{lin}\([^()]*\)\s*\n\s*\1\s*=\s*self\.{act}\(\s*\1\s*\)", src)
    return bool(nested or chained)


# ----------------------------------------------------------------------------- patch / unpatch
@dataclass
class PatchReport:
    """What fl.patch changed (model.fastlayers_patch_report)."""
    family: Optional[str]
    backend: Optional[str]
    attention: Optional[str] = None                       # "sdpa -> fastlayers", or None (not changed)
    swapped: list = field(default_factory=list)           # "path: Old -> New"
    skipped: list = field(default_factory=list)           # "path: why"

    def counts(self) -> dict:
        return dict(collections.Counter(s.split(": ", 1)[1] for s in self.swapped))

    def __str__(self) -> str:
        lines = [f"fl.patch: {self.family or 'generic (strict=False)'}, backend {self.backend or 'auto'}",
                 f"  attention: {self.attention or 'unchanged'}"]
        lines += [f"  {n} x {what}" for what, n in self.counts().items()]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


@dataclass
class _Swap:
    parent: nn.Module
    name: str
    old: nn.Module
    new: nn.Module


@dataclass
class _State:
    swaps: list
    attn: Optional[str]
    attn_set: bool
    backend: Optional[str]


# The oldest transformers whose BERT / RoBERTa / GPT-2 / BART select attention through AttentionInterface
# and build masks through AttentionMaskInterface (4.57 still prepares its own 4-D SDPA masks). Tested
# with 5.0.0, 5.17.0 and 5.24.0.
MIN_TRANSFORMERS = "5.0.0"


def _check_transformers() -> None:
    import transformers
    from packaging.version import Version
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(f"fl.patch needs transformers >= {MIN_TRANSFORMERS} (its models' attention and mask "
                           f"interfaces); found {transformers.__version__}")


def _family(model) -> Optional[_Family]:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for f in FAMILIES:
        if mt == f.model_type and type(model).__module__ == f"transformers.models.{mt}.modeling_{mt}":
            return f
    return None


def _can_use_interface(model) -> bool:
    from transformers import PreTrainedModel
    return isinstance(model, PreTrainedModel) and type(model)._can_set_attn_implementation()


def _plan(model, family, strict, backend, report) -> list:
    """[(path, parent, attribute, new module)] for every swap; raises (strict) before anything changes."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    made = {}  # id(old) -> new: a module shared by two parents gets one replacement
    plan = []
    tver = sys.modules["transformers"].__version__

    def add(path, parent, attr, old, build, what):
        if "forward" in old.__dict__:  # an instance-level forward (accelerate's hooks): keep it
            report.skipped.append(f"{path}: its forward is wrapped (e.g. accelerate hooks)")
            return
        if id(old) not in made:
            made[id(old)] = build()
            report.swapped.append(f"{path}: {what}")
        plan.append((parent, attr, made[id(old)]))

    for ppath, parent in model.named_modules():
        cls = type(parent)
        pre = f"{ppath}." if ppath else ""
        if family is not None:
            pairs = [family.fused[cls.__name__]] if cls.__name__ in family.fused else []
            plain = family.plain.get(cls.__name__, ())
        else:  # generic: a linear child followed by a known activation child, as the forward reads
            lins = [n for n, c in parent._modules.items() if _linear_like(c)]
            acts = [n for n, c in parent._modules.items() if c is not None and _fl_activation(c)]
            pairs = [(lin, act) for lin in lins for act in acts if _reads_act_of_linear(cls, lin, act)]
            plain = ()
        for lin, act in pairs:
            lm, am = parent._modules.get(lin), parent._modules.get(act)
            path = pre + lin
            if not _linear_like(lm):
                report.skipped.append(f"{path}: {type(lm).__name__} is not nn.Linear / Conv1D")
                continue
            if not _reads_act_of_linear(cls, lin, act):
                if strict:
                    raise RuntimeError(
                        f"fl.patch: {cls.__name__}.forward in the installed transformers {tver} no longer reads "
                        f"self.{act}(self.{lin}(x)); fastlayers' table for {family.name} does not match this version "
                        f"(fl.patch(model, strict=False) patches the rest)")
                report.skipped.append(f"{path}: {cls.__name__}.forward does not read self.{act}(self.{lin}(x))")
                continue
            activation = _fl_activation(am) if isinstance(am, nn.Module) else None
            if activation is None or uses[id(lm)] > 1 or uses[id(am)] > 1:
                why = "shared with another module" if activation else f"activation {type(am).__name__} is not fused"
                report.skipped.append(f"{pre}{act}: {why}; {lin} runs on fl.linear without it")
                add(path, parent, lin, lm, functools.partial(_fast_linear, lm, None, backend),
                    f"{type(lm).__name__} -> fastlayers {type(lm).__name__}")
                continue
            kind = type(lm).__name__
            add(path, parent, lin, lm, functools.partial(_fast_linear, lm, activation, backend),
                f"{kind} + {type(am).__name__} -> fastlayers {kind}(activation={activation!r})")
            add(pre + act, parent, act, am, nn.Identity, f"{type(am).__name__} -> Identity (fused)")
        for lin in plain:
            lm = parent._modules.get(lin)
            if _linear_like(lm):
                add(pre + lin, parent, lin, lm, functools.partial(_fast_linear, lm, None, backend),
                    f"{type(lm).__name__} -> fastlayers {type(lm).__name__}")
            else:
                report.skipped.append(f"{pre}{lin}: {type(lm).__name__} is not nn.Linear / Conv1D")
        for name, child in parent._modules.items():
            if type(child) is nn.LayerNorm:
                add(pre + name, parent, name, child, functools.partial(_fast_layer_norm, child, backend),
                    "LayerNorm -> fl.nn.LayerNorm")
    return plan


def patch(model: nn.Module, *, strict: bool = True, backend: Optional[str] = None) -> nn.Module:
    """Puts fastlayers in a transformers model in place and returns it: attention through transformers'
    AttentionInterface (attn_implementation "fastlayers", or "fastlayers_<backend>"), every nn.LayerNorm
    on fl.nn.LayerNorm, and the MLPs' linears on fl.linear with the activation fused, sharing the same
    Parameter objects. Families: BERT, RoBERTa, GPT-2, BART (every head); another model raises unless
    strict=False, which patches what it recognises: nn.LayerNorm, a linear followed by a known
    activation (as its forward reads), and attention when the model selects it through the interface.
    What changed: model.fastlayers_patch_report (also logged at INFO). Undo with fl.unpatch(model)."""
    if backend not in ATTN_NAMES:
        raise ValueError(f"backend: expected one of {tuple(BACKENDS)} or None, got {backend!r}")
    _check_transformers()
    if getattr(model, "_fastlayers_patch", None) is not None:
        raise ValueError("fl.patch: this model is already patched (fl.unpatch(model) first)")
    family = _family(model)
    if family is None and strict:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"fl.patch: {type(model).__name__} (model_type {mt!r}) is not in fastlayers' table. "
                         f"Supported families, every head: {supported_families()}. fl.patch(model, strict=False) "
                         f"patches the generic pieces it recognises (nn.LayerNorm, a linear followed by a known "
                         f"activation, attention through transformers' AttentionInterface) and reports them in "
                         f"model.fastlayers_patch_report.")
    report = PatchReport(family.name if family else None, backend)
    plan = _plan(model, family, strict, backend, report)
    attn, attn_set = None, False
    if _can_use_interface(model):
        _register()
        attn = model.config._attn_implementation
        name = ATTN_NAMES[backend]
        model.set_attn_implementation(name)
        attn_set = model.config._attn_implementation == name
        if attn_set:
            report.attention = f"{attn} -> {name}"
    if not attn_set:
        if strict:
            raise RuntimeError(f"fl.patch: {type(model).__name__} does not take attn_implementation "
                               f"{ATTN_NAMES[backend]!r}")
        report.skipped.append("attention: the model does not select attention through AttentionInterface")
    swaps = []
    for parent, attr, new in plan:
        swaps.append(_Swap(parent, attr, parent._modules[attr], new))
        setattr(parent, attr, new)
    model._fastlayers_patch = _State(swaps, attn, attn_set, backend)
    model.fastlayers_patch_report = report
    logger.info("%s", report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes fl.patch: the original module objects (holding the parameters the patched ones hold now,
    so a .to() or load_state_dict(assign=True) since is kept) and the original attn_implementation."""
    state = getattr(model, "_fastlayers_patch", None)
    if state is None:
        raise ValueError("fl.unpatch: this model was not patched by fl.patch")
    for s in reversed(state.swaps):
        if s.parent._modules.get(s.name) is not s.new:
            logger.warning("fl.unpatch: %s.%s was replaced after fl.patch; left as it is", type(s.parent).__name__,
                           s.name)
            continue
        for pname, p in s.new._parameters.items():
            if s.old._parameters.get(pname) is not p:
                setattr(s.old, pname, p)
        s.old.train(s.new.training)
        setattr(s.parent, s.name, s.old)
    if state.attn_set:
        if isinstance(state.attn, str):
            model.set_attn_implementation(state.attn)
        else:
            model.config._attn_implementation = state.attn
    del model._fastlayers_patch
    del model.fastlayers_patch_report
    return model
