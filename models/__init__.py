"""fastlayers.models: BERT (GPT-2 and BART to come) on fastlayers ops, loading and saving Hugging
Face checkpoints from local folders (nothing is downloaded).

    from fastlayers.models import AutoModel, BertForSequenceClassification, load_tokenizer, pipeline
    model = AutoModel.from_pretrained("path/to/folder", dtype=torch.bfloat16, device="cuda")
"""
from .auto import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForMultipleChoice,  # noqa: F401
                   AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                   AutoModelForTokenClassification, model_for_architecture, register, supported_model_types)
from .bert import (BertForMaskedLM, BertForMultipleChoice, BertForQuestionAnswering,  # noqa: F401
                   BertForSequenceClassification, BertForTokenClassification, BertModel)
from .config import BertConfig, ConfigError, ModelConfig  # noqa: F401
from .loading import CheckpointError, PreTrainedModel, resolve_model_dir  # noqa: F401
