"""ds-longformer: a DeepSpeed-scaled trainer for the Longformer (Beltagy et al., 2020)."""

from .attention import AttentionLayout, LongformerSelfAttention
from .config import LongformerConfig
from .model import (
    LongformerForCandidateScoring,
    LongformerForMaskedLM,
    LongformerForSequenceClassification,
    LongformerModel,
)

__all__ = [
    "AttentionLayout",
    "LongformerConfig",
    "LongformerForCandidateScoring",
    "LongformerForMaskedLM",
    "LongformerForSequenceClassification",
    "LongformerModel",
    "LongformerSelfAttention",
]
