"""ds-longformer: a DeepSpeed-scaled trainer for the Longformer (Beltagy et al., 2020)."""

from .attention import AttentionLayout, LongformerSelfAttention
from .config import LongformerConfig
from .model import (
    LongformerForCandidateScoring,
    LongformerForMaskedLM,
    LongformerForMultipleChoice,
    LongformerForQuestionAnswering,
    LongformerForSequenceClassification,
    LongformerForTokenClassification,
    LongformerModel,
    LongformerPreTrainedModel,
)

__all__ = [
    "AttentionLayout",
    "LongformerConfig",
    "LongformerForCandidateScoring",
    "LongformerForMaskedLM",
    "LongformerForMultipleChoice",
    "LongformerForQuestionAnswering",
    "LongformerForSequenceClassification",
    "LongformerForTokenClassification",
    "LongformerModel",
    "LongformerPreTrainedModel",
    "LongformerSelfAttention",
]
