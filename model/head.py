"""The base class of every head: what a head on the backbone's tokens may contribute to the model.

An embedding head (PHP) adds, from `embed`, a feature to a modality's global feature, so it shapes the
embeddings used for retrieval, and may hand side outputs to the losses (PHP's MoE balancing loss). A head may also
give embeddings of its own, of any width (`embeddings`: RDE's TSE), and declare how the model's named embeddings
combine into the one similarity of a query and a gallery item (`similarity`); it may ask for the last transformer
block's attention of each tower (`needs_attention`). A training head (IRRA's ID classifier and MLM branch) only
gives the losses what they need, from `outputs`, during training; it does not change the embeddings. A head may
do several of these. Heads are registered by name (model/registry.py) and live on the model under that name, so
their weights are `<name>.*` in the state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

Embedding = Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclass
class Tower:
    """One tower's outputs for a batch, as `Head.embeddings` gets them."""

    modality: str  # "image" or "text"
    tokens: torch.Tensor  # [B, L, D] every token after the projection (image: index 0 is the CLS token)
    padding_mask: Optional[torch.Tensor]  # [B, L] True at text padding; None for images
    ids: Optional[torch.Tensor]  # [B, L] the caption ids (text); None for images
    # [B, L, L] the last block's attention probabilities, averaged over heads (float32), when a head asks for it
    attention: Optional[torch.Tensor] = None


class Head(nn.Module):
    # Set by a head that needs the last block's attention of each tower (computed only when some head asks).
    needs_attention = False
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

    def embeddings(self, tower: Tower) -> Dict[str, torch.Tensor]:
        """Named embeddings of this head, each [B, width] of any width: beside the model's `global` one, they are
        what `similarity` may combine (and reach the losses as `<modality>_<name>`)."""
        return {}

    def embedding_widths(self) -> Dict[str, int]:
        """The width of each embedding `embeddings` gives."""
        return {}

    def similarity(self) -> Optional[Dict[str, float]]:
        """How the model's named embeddings make one similarity: {name: weight}, the similarity being the weighted
        sum of each embedding's cosine ('global' is the backbone's feature plus the `embed` heads'). None: this
        head does not decide it (the default similarity is the cosine of `global`)."""
        return None

    @property
    def batch_dependent(self) -> bool:
        """True when an embedding depends on the other samples of its batch."""
        return False

    # Evaluation modes. 'none' is every head's own; a head may also reproduce a reference release's behaviour
    # under a name of its own (the mode a published layout is evaluated in, model/layouts.py).
    modes: Tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """The mode the head runs in now."""
        return "none"

    def set_mode(self, mode: str) -> Dict[str, Any]:
        """Run in `mode` ('none', or one of `modes`; other heads' modes leave this one as it is); returns the
        options that mode means for the run's config."""
        return {}

    def mode_warning(self) -> str:
        """What a user must know while the head runs in a mode other than 'none' (its batch dependence)."""
        return ""

    # What a head measures during an evaluation (the embedding pass resets it first).
    def reset_report(self) -> None:
        pass

    def report(self, out_dir: Optional[str] = None) -> Dict[str, Any]:
        """The measurements since reset_report, as {record key: JSON-ready value} for the run's results; may log
        them and write files into `out_dir`. {} when there is nothing to report."""
        return {}
