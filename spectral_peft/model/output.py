"""What a model's forward returns.

Shape legend: B batch, T sequence, C width, V vocabulary, K num_labels.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelOutput:
    """logits: GPT-2 (B, T, V), BERT classifier (B, K), None for a bare BertModel;
    loss: the mean loss as a Python float when labels were given, else None;
    last_hidden_state: (B, T, C) for a bare BertModel (the encoder's output), else None;
    pooler_output: (B, C), tanh(dense(h[:, 0])), for BERT models that have a pooler, else None."""

    logits: object = None
    loss: float | None = None
    last_hidden_state: object = None
    pooler_output: object = None
