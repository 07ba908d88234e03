"""BERT with per-layer head counts and FFN widths, HF module names kept (see DESIGN.md section 6)."""

from .bert import (
    BertForPreTrainingOutput,
    DistSparseBertForMaskedLM,
    DistSparseBertForPreTraining,
    DistSparseBertForQuestionAnswering,
    DistSparseBertForSequenceClassification,
    DistSparseBertForTokenClassification,
    DistSparseBertModel,
    DistSparseBertPreTrainedModel,
    padding_mask_to_additive,
)
from .config import DistSparseBertConfig
from .presets import PRESETS, build_config, build_model, count_parameters, dense_flops_per_token


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForPreTraining`` / ``AutoModelForMaskedLM`` /
    ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` /
    ``AutoModelForQuestionAnswering`` resolve ``model_type="dist_sparse_bert"``, so saved folders
    load through the Auto API.

    Idempotent (``exist_ok=True``): importing this package twice, or another module registering
    the same classes again, must not raise.
    """
    from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining,
                              AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    AutoConfig.register(DistSparseBertConfig.model_type, DistSparseBertConfig, exist_ok=True)
    AutoModel.register(DistSparseBertConfig, DistSparseBertModel, exist_ok=True)
    AutoModelForPreTraining.register(DistSparseBertConfig, DistSparseBertForPreTraining, exist_ok=True)
    AutoModelForMaskedLM.register(DistSparseBertConfig, DistSparseBertForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(DistSparseBertConfig, DistSparseBertForSequenceClassification,
                                                exist_ok=True)
    AutoModelForTokenClassification.register(DistSparseBertConfig, DistSparseBertForTokenClassification, exist_ok=True)
    AutoModelForQuestionAnswering.register(DistSparseBertConfig, DistSparseBertForQuestionAnswering, exist_ok=True)


register_auto_classes()

__all__ = [
    "PRESETS",
    "BertForPreTrainingOutput",
    "DistSparseBertConfig",
    "DistSparseBertForMaskedLM",
    "DistSparseBertForPreTraining",
    "DistSparseBertForQuestionAnswering",
    "DistSparseBertForSequenceClassification",
    "DistSparseBertForTokenClassification",
    "DistSparseBertModel",
    "DistSparseBertPreTrainedModel",
    "build_config",
    "build_model",
    "count_parameters",
    "dense_flops_per_token",
    "padding_mask_to_additive",
    "register_auto_classes",
]
