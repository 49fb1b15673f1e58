"""fastlayers.models: BERT and GPT-2 (BART to come) on fastlayers ops, loading and saving Hugging
Face checkpoints from local folders (nothing is downloaded).

    from fastlayers.models import AutoModel, BertForSequenceClassification, load_tokenizer, pipeline
    model = AutoModel.from_pretrained("path/to/folder", dtype=torch.bfloat16, device="cuda")
"""
from .auto import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForMultipleChoice,  # noqa: F401
                   AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                   AutoModelForTokenClassification, model_for_architecture, register, supported_model_types)
from .bert import (BertForMaskedLM, BertForMultipleChoice, BertForQuestionAnswering,  # noqa: F401
                   BertForSequenceClassification, BertForTokenClassification, BertModel)
from .config import BertConfig, ConfigError, GPT2Config, ModelConfig  # noqa: F401
from .generation import GenerationConfig, StaticKVCache  # noqa: F401
from .gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model  # noqa: F401
from .loading import CheckpointError, PreTrainedModel, resolve_model_dir  # noqa: F401
from .auto import AutoModelForSeq2SeqLM  # noqa: F401
from .bart import BartForConditionalGeneration, BartForSequenceClassification, BartModel  # noqa: F401
from .config import BartConfig  # noqa: F401
from .pipelines import PipelineError, pipeline  # noqa: F401
from .tokenizer import BatchEncoding, Tokenizer, TokenizerError, load_tokenizer  # noqa: F401
