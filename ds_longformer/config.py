"""LongformerConfig: the model's hyper-parameters, read and written as Hugging Face `config.json`.

Field names are those of `transformers.LongformerConfig`, so a folder we save loads in
`transformers` and theirs loads here. Fields only we use (`attention_backend`,
`attention_block_size`, `gradient_checkpointing`) are written too; `transformers` keeps unknown
fields as plain attributes and ignores them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

BACKENDS = ("blocked", "flex", "dense")


@dataclass
class LongformerConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int | None = 0  # None where the source model names none (BERT configs)
    eos_token_id: int | None = 2
    sep_token_id: int | None = 2
    # Total window per layer (an int for every layer, or one per layer): token i attends to
    # tokens j with |i - j| <= attention_window / 2.
    attention_window: int | list[int] = 512
    # Heads: label count and names for sequence classification.
    num_labels: int = 2
    id2label: dict | None = None
    classifier_dropout: float | None = None
    problem_type: str | None = None  # regression / single_label_classification / multi_label_classification
    # ds-longformer only.
    attention_backend: str = "blocked"
    # Query block size of the blocked backend; None = half the window (one block each side).
    attention_block_size: int | None = None
    gradient_checkpointing: bool = False
    architectures: list[str] | None = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept on save

    def __post_init__(self):
        if isinstance(self.attention_window, int):
            self.attention_window = [self.attention_window] * self.num_hidden_layers
        self.attention_window = [int(w) for w in self.attention_window]
        self.validate()

    def validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if len(self.attention_window) != self.num_hidden_layers:
            raise ValueError(
                f"attention_window has {len(self.attention_window)} entries but the model has "
                f"num_hidden_layers={self.num_hidden_layers}: give one window or one per layer"
            )
        for layer, w in enumerate(self.attention_window):
            if w <= 0 or w % 2:
                raise ValueError(
                    f"attention_window[{layer}] = {w}: each window must be a positive even number "
                    "(the total span; each side sees window/2 tokens)"
                )
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}: choose one of {BACKENDS}")
        if self.attention_block_size is not None and self.attention_block_size <= 0:
            raise ValueError(f"attention_block_size={self.attention_block_size} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (positions start after the padding index)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        if d["id2label"] is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in d["id2label"].items()}
            d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return {**extra, **d, "model_type": "longformer"}

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "LongformerConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        d = {**d, **overrides}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "id2label" in kwargs and kwargs["id2label"] is not None:
            kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
            kwargs.setdefault("num_labels", len(kwargs["id2label"]))
        skip = {"model_type", "label2id", "transformers_version"}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known and k not in skip}
        if kwargs.get("type_vocab_size") is None:
            kwargs.pop("type_vocab_size", None)
        return cls(**kwargs)

    def save(self, folder: str | Path):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | Path, **overrides) -> "LongformerConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face save_pretrained folder")
        d = json.loads(path.read_text())
        if d.get("model_type", "longformer") != "longformer":
            raise ValueError(
                f"{path}: model_type={d.get('model_type')!r} is not a Longformer; "
                "convert a short model with `python -m ds_longformer.convert`"
            )
        return cls.from_dict(d, **overrides)
