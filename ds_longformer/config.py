"""LongformerConfig: transformers' LongformerConfig, with the fields only we use, checked early.

A `transformers.LongformerConfig` subclass: the same field names and defaults (the same
constructor arguments build the same model in both libraries), `model_type` "longformer", and
transformers' own `from_pretrained`/`save_pretrained`/`to_dict`. Ours only:

    attention_backend     "blocked" (default), "flex" or "dense" (attention.BACKENDS)
    attention_block_size  query block of the blocked backend; None = window / 2
    classifier_dropout    dropout of the classification heads; None = hidden_dropout_prob

They are written to config.json too; transformers keeps unknown fields as plain attributes and
ignores them. `attention_window` is always one value per layer once built.
"""

from __future__ import annotations

import transformers
from transformers.activations import ACT2FN

from .attention import check_backend


class LongformerConfig(transformers.LongformerConfig):
    attention_backend: str = "blocked"
    attention_block_size: int | None = None
    classifier_dropout: float | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' from_dict (used by from_pretrained), which sets the keyword overrides
        after building: checked again with them."""
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate()
        return result

    def validate(self):
        """transformers' checks, then ours; every error names the field. An int window becomes one
        per layer."""
        super().validate()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if isinstance(self.attention_window, int):
            self.attention_window = [self.attention_window] * self.num_hidden_layers
        if len(self.attention_window) != self.num_hidden_layers:
            raise ValueError(f"attention_window has {len(self.attention_window)} entries but the model has "
                             f"num_hidden_layers={self.num_hidden_layers}: give one window or one per layer")
        for layer, w in enumerate(self.attention_window):
            if not isinstance(w, int) or w <= 0 or w % 2:
                raise ValueError(f"attention_window[{layer}] = {w}: each window must be a positive even number "
                                 "(the total span; each side sees window/2 tokens)")
        check_backend(self.attention_backend, self.attention_probs_dropout_prob)
        if self.attention_block_size is not None and self.attention_block_size <= 0:
            raise ValueError(f"attention_block_size={self.attention_block_size} must be positive")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of {sorted(ACT2FN)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (positions start after the padding index)."""
        return self.max_position_embeddings - self.pad_token_id - 1
