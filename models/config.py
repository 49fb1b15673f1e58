"""Typed model configs read from a checkpoint's `config.json` (Hugging Face transformers' format).

A config is a dataclass: the fields the architecture reads, typed and validated, plus `extra`,
every other key of the file, kept as read so that a config saved again loses nothing.
`from_pretrained(dir)` reads `dir/config.json`; `save_pretrained(dir)` writes it back in the
format transformers reads (`id2label` keys as strings, `dtype` as a name).

A field the architecture needs and the code does not implement raises `ConfigError` naming the
field, the supported values and the value found (for example BERT's `position_embedding_type`
other than "absolute").
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

CONFIG_NAME = "config.json"


class ConfigError(ValueError):
    """A config.json value that fastlayers does not implement, or that is not valid."""


@dataclass
class ModelConfig:
    """Fields every family shares (names and defaults as transformers' PretrainedConfig)."""
    model_type: ClassVar[str] = ""
    architectures: Optional[list] = None
    id2label: Optional[dict] = None          # {int: str}; None -> num_labels=2 with LABEL_0, LABEL_1
    label2id: Optional[dict] = None          # {str: int}
    problem_type: Optional[str] = None       # regression | single_label_classification | multi_label_classification
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None                 # int or list of ints
    tie_word_embeddings: bool = True
    dtype: Optional[str] = None              # the checkpoint's dtype name ("float32", "bfloat16", ...)
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        if self.id2label is None:
            self.id2label = {0: "LABEL_0", 1: "LABEL_1"}
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ConfigError("problem_type: expected None, 'regression', 'single_label_classification' or "
                              f"'multi_label_classification', got {self.problem_type!r}")
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError for a value the family does not implement (per-family override)."""

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_labels: expected an int >= 1, got {n!r}")
        if n != self.num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "ModelConfig":
        """Known keys -> fields, the rest -> `extra`; `overrides` as transformers' config kwargs
        (`num_labels=3` included). A model_type that is not this family's raises."""
        d = dict(d)
        d.update(overrides)
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ConfigError(f"model_type: {cls.__name__} reads model_type {cls.model_type!r}, got {mt!r}")
        if "torch_dtype" in d and "dtype" not in d:    # the transformers 4.x name
            d["dtype"] = d.pop("torch_dtype")
        num_labels = d.pop("num_labels", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if isinstance(known.get("dtype"), dict) or (known.get("dtype") is not None and not isinstance(known["dtype"], str)):
            known["dtype"] = str(known["dtype"]).replace("torch.", "")
        cfg = cls(**known, extra=extra)
        if num_labels is not None and ("id2label" not in known or num_labels != cfg.num_labels):
            cfg.num_labels = num_labels
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir, **overrides) -> "ModelConfig":
        """Reads `model_dir/config.json` (a local folder or an alias that resolve_model_dir knows)."""
        from .loading import resolve_model_dir
        return cls.from_dict(read_config_dict(resolve_model_dir(model_dir)), **overrides)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict:
        d: dict = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name == "id2label":
                v = {str(k): val for k, val in v.items()}
            d[f.name] = v
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())

    def __getattr__(self, name: str):
        # unknown config.json keys read as attributes, as on transformers' configs
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")


def read_config_dict(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"model_dir: no {CONFIG_NAME} in {str(model_dir)!r}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _choice(cfg, name: str, allowed) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name}: fastlayers implements {sorted(allowed)}, got {value!r}")


def _positive(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}: expected an int >= 1, got {v!r}")


def _probability(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            raise ConfigError(f"{name}: expected a probability in [0, 1), got {v!r}")


# transformers' activation names -> fl.linear's fused epilogue
ACTIVATION_OF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                 "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass
class BertConfig(ModelConfig):
    """transformers' BertConfig fields (same names and defaults: bert-base-uncased)."""
    model_type: ClassVar[str] = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: Optional[float] = None
    is_decoder: bool = False
    add_cross_attention: bool = False

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size")
        _choice(self, "hidden_act", ACTIVATION_OF)
        _choice(self, "position_embedding_type", {"absolute"})
        _choice(self, "is_decoder", {False})
        _choice(self, "add_cross_attention", {False})
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size: must be a multiple of num_attention_heads={self.num_attention_heads}, "
                              f"got {self.hidden_size}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ConfigError(f"layer_norm_eps: expected a float > 0, got {self.layer_norm_eps!r}")


@dataclass
class GPT2Config(ModelConfig):
    """transformers' GPT2Config fields (same names and defaults: gpt2, 124M)."""
    model_type: ClassVar[str] = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None            # None -> 4 * n_embd
    activation_function: str = "gelu_new"    # gelu_new: GELU, tanh approximation
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True          # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False   # scores / (layer_idx + 1) as well
    reorder_and_upcast_attn: bool = False    # fp32 scores: what the fused kernels always do
    add_cross_attention: bool = False
    bos_token_id: Optional[int] = 50256
    eos_token_id: Any = 50256

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self) -> None:
        _positive(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        if self.n_inner is not None:
            _positive(self, "n_inner")
        _choice(self, "activation_function", ACTIVATION_OF)
        _choice(self, "add_cross_attention", {False})
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            _choice(self, name, {True, False})
        _probability(self, "resid_pdrop", "embd_pdrop", "attn_pdrop")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd: must be a multiple of n_head={self.n_head}, got {self.n_embd}")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon: expected a float > 0, got {self.layer_norm_epsilon!r}")


@dataclass
class BartConfig(ModelConfig):
    """transformers' BartConfig fields (same names and defaults: facebook/bart-large). Three labels
    by default (id2label None -> LABEL_0..2), as transformers' BartConfig."""
    model_type: ClassVar[str] = "bart"
    vocab_size: int = 50265
    max_position_embeddings: int = 1024      # embed_positions hold max_position_embeddings + 2 rows (offset 2)
    encoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_layers: int = 12
    decoder_ffn_dim: int = 4096
    decoder_attention_heads: int = 16
    encoder_layerdrop: float = 0.0           # training only: each layer skipped with this probability
    decoder_layerdrop: float = 0.0
    activation_function: str = "gelu"
    d_model: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    classifier_dropout: Optional[float] = 0.0
    scale_embedding: bool = False            # word embeddings * sqrt(d_model)
    use_cache: bool = True
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Any = 2
    is_encoder_decoder: bool = True
    decoder_start_token_id: Optional[int] = 2
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Any = 2
    is_decoder: bool = False

    def __post_init__(self):
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(3)}
        super().__post_init__()

    # transformers' attribute_map
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.encoder_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.encoder_layers

    def validate(self) -> None:
        _positive(self, "vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "decoder_layers",
                  "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim")
        _choice(self, "activation_function", ACTIVATION_OF)
        _choice(self, "is_encoder_decoder", {True})
        _choice(self, "is_decoder", {False})
        for name in ("scale_embedding", "use_cache"):
            _choice(self, name, {True, False})
        _probability(self, "dropout", "attention_dropout", "activation_dropout", "classifier_dropout",
                     "encoder_layerdrop", "decoder_layerdrop")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ConfigError(f"d_model: must be a multiple of {name}={getattr(self, name)}, got {self.d_model}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id: expected None or an id in [0, vocab_size={self.vocab_size}), "
                              f"got {self.pad_token_id!r}")
