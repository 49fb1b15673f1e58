"""Auto classes: the model class from a checkpoint's `model_type` (and `architectures`).

    AutoConfig.from_pretrained(dir)                     -> the family's config
    AutoModel.from_pretrained(dir, dtype=, device=)     -> the family's base model
    AutoModelForMaskedLM / ForSequenceClassification / ForTokenClassification /
    ForQuestionAnswering / ForMultipleChoice / ForCausalLM / ForSeq2SeqLM  -> that head
    model_for_architecture(dir)                         -> the class named in config.json's
                                                           `architectures` (what the file was saved as)
Families register with `register(model_type, config_class, **{task: class})`; GPT-2 and BART add
themselves the same way. An unsupported model_type or task raises ValueError listing what is.
"""
from __future__ import annotations

from .config import ConfigError, read_config_dict
from .loading import resolve_model_dir

_CONFIGS: dict = {}
_MODELS: dict = {}      # model_type -> {task: class}


def register(model_type: str, config_class, **tasks) -> None:
    _CONFIGS[model_type] = config_class
    _MODELS.setdefault(model_type, {}).update(tasks)


def supported_model_types() -> list:
    return sorted(_CONFIGS)


def _model_type(d: dict, where: str) -> str:
    mt = d.get("model_type")
    if mt is None:  # very old configs: infer from the architecture's class name
        for arch in d.get("architectures") or ():
            for t in _CONFIGS:
                if arch.lower().startswith(t.replace("_", "").lower()):
                    return t
        raise ConfigError(f"{where}: config.json has no model_type (and no known architectures); supported "
                          f"model types: {supported_model_types()}")
    if mt not in _CONFIGS:
        raise ConfigError(f"model_type: fastlayers supports {supported_model_types()}, got {mt!r} ({where})")
    return mt


class AutoConfig:
    @staticmethod
    def from_pretrained(model_dir, **overrides):
        path = resolve_model_dir(model_dir)
        d = read_config_dict(path)
        mt = _model_type(d, str(path))
        d["model_type"] = mt
        return _CONFIGS[mt].from_dict(d, **overrides)

    @staticmethod
    def for_model(model_type: str, **fields):
        if model_type not in _CONFIGS:
            raise ConfigError(f"model_type: fastlayers supports {supported_model_types()}, got {model_type!r}")
        return _CONFIGS[model_type](**fields)


class _AutoModel:
    task = "base"

    @classmethod
    def model_class(cls, config):
        tasks = _MODELS.get(config.model_type, {})
        if cls.task not in tasks:
            have = sorted(t for t, m in _MODELS.items() if cls.task in m)
            raise ValueError(f"model_type: {cls.__name__} supports {have}, got {config.model_type!r}")
        return tasks[cls.task]

    @classmethod
    def from_config(cls, config):
        """A randomly initialised model (transformers' init) of the config's family."""
        return cls.model_class(config)(config)

    @classmethod
    def from_pretrained(cls, model_dir, *, dtype=None, device=None, **kwargs):
        """See PreTrainedModel.from_pretrained; config fields may be passed as kwargs (num_labels=3)."""
        config = kwargs.pop("config", None)
        load_kwargs = {k: kwargs.pop(k) for k in ("output_loading_info", "ignore_mismatched_sizes") if k in kwargs}
        if config is None:
            config = AutoConfig.from_pretrained(model_dir, **kwargs)
        elif kwargs:
            raise TypeError(f"from_pretrained: pass either config or config fields, not both (got {sorted(kwargs)})")
        return cls.model_class(config).from_pretrained(model_dir, dtype=dtype, device=device, config=config,
                                                       **load_kwargs)


class AutoModel(_AutoModel):
    task = "base"


class AutoModelForMaskedLM(_AutoModel):
    task = "masked-lm"


class AutoModelForSequenceClassification(_AutoModel):
    task = "sequence-classification"


class AutoModelForTokenClassification(_AutoModel):
    task = "token-classification"


class AutoModelForQuestionAnswering(_AutoModel):
    task = "question-answering"


class AutoModelForMultipleChoice(_AutoModel):
    task = "multiple-choice"


class AutoModelForCausalLM(_AutoModel):
    task = "causal-lm"


class AutoModelForSeq2SeqLM(_AutoModel):
    task = "seq2seq-lm"


def model_for_architecture(model_dir):
    """The class that config.json's `architectures[0]` names (a fastlayers class of the same name),
    else the family's base model."""
    config = AutoConfig.from_pretrained(model_dir)
    tasks = _MODELS[config.model_type]
    by_name = {c.__name__: c for c in tasks.values()}
    for arch in config.architectures or ():
        if arch in by_name:
            return by_name[arch]
    return tasks["base"]


def _register_builtin() -> None:
    from . import bart, bert, gpt2
    from .config import BartConfig, BertConfig, GPT2Config
    register("bart", BartConfig, base=bart.BartModel, **{
        "seq2seq-lm": bart.BartForConditionalGeneration,
        "sequence-classification": bart.BartForSequenceClassification})
    register("gpt2", GPT2Config, base=gpt2.GPT2Model, **{
        "causal-lm": gpt2.GPT2LMHeadModel, "sequence-classification": gpt2.GPT2ForSequenceClassification})
    register("bert", BertConfig, base=bert.BertModel, **{
        "masked-lm": bert.BertForMaskedLM, "sequence-classification": bert.BertForSequenceClassification,
        "token-classification": bert.BertForTokenClassification,
        "question-answering": bert.BertForQuestionAnswering, "multiple-choice": bert.BertForMultipleChoice})


_register_builtin()
