"""RDE's TSE, token selection embedding (SPEC 12): an embedding of the tokens the last block attends to most.

Per modality, from the last transformer block's attention A (averaged over heads; the model keeps it because this
head asks, `needs_attention`), with `select_ratio` r:
- image: k = floor((L - 1) r) patch tokens, ranked by the CLS row of A (the CLS column excluded);
- text: k = floor((L - 2) r) tokens, ranked by the EOS row of A (SOS and EOS columns excluded, padding zeroed).
The selected tokens (after the projection) are L2-normalised, mapped per token by MLP(x) + Linear(x) to width 2D,
and max-pooled (text: over the first min(k, length - 2) selected, length counting SOS and EOS). The embedding is
`tse`; with the backbone's `global` one (BGE) the similarity is (cos_bge + cos_tse) / 2 (`rde_similarity: fused`),
or either alone. Weights are `tse.image.*` / `tse.text.*` (the reference's `visul_emb_layer` /
`texual_emb_layer`; layout.py maps them).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.head import Head, Tower
from model.registry import HeadContext, register_head
from utils.errors import UserError
from utils.schema import Option

from . import HEAD, LOSS

SIMILARITIES = {"fused": {"global": 0.5, "tse": 0.5}, "bge": {"global": 1.0}, "tse": {"tse": 1.0}}


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / (|x| + 1e-8), as the reference normalises the selected tokens."""
    return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-8)


class TokenMLP(nn.Module):
    """Linear(D, H) -> BatchNorm1d(H) -> ReLU -> Linear(H, E) per token; `bns.1` exists in the reference's state dict
    and is never applied."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, out)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        y = F.relu(self.bns[0](self.layers[0](x.reshape(b * n, d))))
        return self.layers[1](y).view(b, n, -1)


class ImageSelection(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.linear = nn.Linear(dim, width)  # in the reference's state dict, unused by its image side
        self.fc = nn.Linear(dim, width)
        self.mlp = TokenMLP(dim, width // 2, width)

    def forward(self, tokens: torch.Tensor, attention: torch.Tensor, ratio: float) -> torch.Tensor:
        k = max(1, int((attention.shape[1] - 1) * ratio))
        scores = attention[:, 0].clone()
        scores[:, 0] = -1.0  # the CLS token itself
        chosen = scores.topk(k, dim=-1).indices
        x = l2norm(torch.gather(tokens, 1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])))
        return (self.fc(x) + self.mlp(x)).max(dim=1).values


class TextSelection(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.linear = nn.Linear(dim, width)
        self.mlp = TokenMLP(dim, width // 2, width)

    def forward(self, tokens: torch.Tensor, attention: torch.Tensor, ids: torch.Tensor, ratio: float) -> torch.Tensor:
        b, length = ids.shape
        k = max(1, int((length - 2) * ratio))
        rows = torch.arange(b, device=ids.device)
        eos = ids.argmax(dim=-1)
        scores = attention[rows, eos].clone()
        scores[rows, eos] = -1.0
        scores[:, 0] = -1.0
        scores = scores * (ids != 0)
        chosen = scores.topk(k, dim=-1).indices
        x = l2norm(torch.gather(tokens, 1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])))
        features = self.linear(x) + self.mlp(x)
        # A caption of n words pools its first min(k, n) selected tokens (ranked by attention).
        words = ((ids != 0).sum(dim=1) - 2).clamp(min=1, max=k)
        pooled = torch.arange(k, device=ids.device).unsqueeze(0) < words.unsqueeze(1)
        return features.masked_fill(~pooled.unsqueeze(-1), float("-inf")).max(dim=1).values


class TSEHead(Head):
    needs_attention = True

    def __init__(self, dim: int, ratio: float = 0.3, similarity: str = "fused"):
        super().__init__()
        self.width = 2 * dim  # 1024 for CLIP ViT-B/16's 512
        self.ratio = ratio
        self.similarity_mode = similarity
        self.image = ImageSelection(dim, self.width)
        self.text = TextSelection(dim, self.width)
        # In the reference's state dict but never used: frozen, so no optimizer (nor DDP) waits for their gradient.
        for unused in (self.image.linear, self.image.mlp.bns[1], self.text.mlp.bns[1]):
            unused.requires_grad_(False)

    def embeddings(self, tower: Tower) -> Dict[str, torch.Tensor]:
        if tower.attention is None:
            raise RuntimeError("the TSE head needs the last block's attention, which the model did not keep")
        if tower.modality == "image":
            return {"tse": self.image(tower.tokens, tower.attention, self.ratio)}
        return {"tse": self.text(tower.tokens, tower.attention, tower.ids, self.ratio)}

    def embedding_widths(self) -> Dict[str, int]:
        return {"tse": self.width}

    def similarity(self) -> Optional[Dict[str, float]]:
        return SIMILARITIES[self.similarity_mode]


def sizes(state: Dict[str, torch.Tensor], dim: int) -> Dict[str, object]:
    """Nothing to read from the weights but their width, which must be this head's."""
    key = f"{HEAD}.image.fc.weight"
    width = state[key].shape[0] if key in state else 2 * dim
    if width != 2 * dim:
        raise UserError(f"TSE layers of width {width}; this project's TSE is 2 x the embedding width ({2 * dim})")
    return {}


@register_head(HEAD, enabled=lambda cfg: LOSS in cfg.losses, lr_factor="tse_lr_factor", bias_lr_factor=1.0,
               order=40, sizes=sizes,
               options=[Option("select_ratio", float, 0.3, "RDE TSE: share of the tokens selected by attention.",
                               positive=True),
                        Option("tse_lr_factor", float, 100.0, "RDE TSE: learning-rate factor of the TSE layers (the "
                                                               "reference trains them at 1e-3 = 100 x lr).",
                               minimum=0),
                        Option("rde_similarity", str, "fused", "RDE: the similarity of retrieval: fused ((BGE + TSE) "
                                                               "/ 2), bge or tse alone; may change at test time.",
                               choices=tuple(SIMILARITIES))])
def build_tse_head(cfg, ctx: HeadContext) -> TSEHead:
    return TSEHead(ctx.dim, cfg.select_ratio, cfg.rde_similarity)
