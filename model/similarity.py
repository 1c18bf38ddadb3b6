"""The similarity of a query and a gallery item, as a method declares it from its named embeddings.

A similarity is a weighted sum of cosines, `s(q, g) = sum_k w_k cos(q_k, g_k)` over named embeddings k (`global`,
`tse`, ...). It is the dot product of the vectors `cat_k sqrt(w_k) * q_k / |q_k|`, its retrieval features, so every
path that scores (the metrics, the audit, the gallery cache, the search) works on one vector per item and a plain
product. The default, {"global": 1}, gives F.normalize(global) itself: the features, and with them every score of
IRRA and PHP, are what they were before methods could declare another one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Similarity:
    weights: Tuple[Tuple[str, float], ...] = (("global", 1.0),)

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> "Similarity":
        if not weights or any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"a similarity needs non-negative weights, one positive; got {dict(weights)}")
        return cls(tuple((name, float(w)) for name, w in weights.items() if w > 0))

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    def width(self, widths: Mapping[str, int]) -> int:
        """The width of the retrieval features, from the width of each named embedding."""
        return sum(widths[name] for name in self.names)

    def features(self, embeddings: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 [B, width] whose dot products are the similarities of the items embedded as `embeddings`."""
        parts = []
        for name, weight in self.weights:
            part = F.normalize(embeddings[name].float(), dim=-1)
            parts.append(part if weight == 1.0 else part * math.sqrt(weight))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def describe(self) -> str:
        if len(self.weights) == 1:
            return f"cosine of {self.weights[0][0]}"
        return " + ".join(f"{w:g} cos({name})" for name, w in self.weights)


DEFAULT = Similarity()


def raw_embeddings(embeddings: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Every named embedding side by side, unnormalised ('global' first): what the audit compares across
    batchings."""
    names = ["global", *sorted(k for k in embeddings if k != "global")]
    return torch.cat([embeddings[k].float() for k in names if k in embeddings], dim=-1)
