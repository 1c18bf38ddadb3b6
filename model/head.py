"""The base class of every head: what a head on the backbone's tokens may contribute to the model.

An embedding head (PHP) adds, from `embed`, a feature to a modality's global feature, so it shapes the
embeddings used for retrieval, and may hand side outputs to the losses (PHP's MoE balancing loss). A training
head (IRRA's ID classifier and MLM branch) only gives the losses what they need, from `outputs`, during
training; it does not change the embeddings. A head may do both. Heads are registered by name
(model/registry.py) and live on the model under that name, so their weights are `<name>.*` in the state dict.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

Embedding = Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


class Head(nn.Module):
    def embed(self, tokens: torch.Tensor, modality: str, padding_mask: Optional[torch.Tensor] = None) -> Embedding:
        """tokens: every token of `modality` ('image': [B, 1 + patches, D], index 0 the CLS token; 'text':
        [B, L, D]) after the backbone's projection; padding_mask [B, L] True at text padding (None for images).

        Returns None, or (a feature [B, D] added to the modality's global feature, side outputs for the losses,
        which reach them as `<modality>_<key>`)."""
        return None

    def outputs(self, out: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
        """What this head's losses need, computed from the step's tensors `out` (RetrievalModel.forward lists
        them) and the model (e.g. its backbone); added to `out` before the losses run."""
        return {}

    @property
    def batch_dependent(self) -> bool:
        """True when an embedding depends on the other samples of its batch."""
        return False
