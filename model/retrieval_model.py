"""The retrieval model: CLIP backbone, optional PHP head, optional IRRA head (ID classifier, MLM branch).

Embeddings (SPEC 5, 6): image i = g_v + PHP(V[:, 1:]), text t = g_t + PHP(T) with the PHP head, else g_v / g_t.
`model(batch)` returns every active loss under `<name>_loss`, already weighted, plus diagnostics; the trainer
sums the keys that end in `_loss`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from open_clip.model import CLIP
from torch import nn

from model import losses
from model.backbone import eot_features, image_tokens, text_tokens
from model.irra_head import MLMHead
from model.php_head import PHPHead

CONTRASTIVE = ("itc", "sdm", "cmpm")

# (image_feats, text_feats, pids) -> the same three over every process's batch; see utils/distributed.py.
Gatherer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class RetrievalModel(nn.Module):
    def __init__(self, backbone: CLIP, loss_weights: Dict[str, float], temperature: float = 0.02,
                 php: Optional[PHPHead] = None, classifier: Optional[nn.Linear] = None,
                 mlm: Optional[MLMHead] = None):
        super().__init__()
        self.backbone = backbone
        self.php = php
        self.classifier = classifier
        self.mlm = mlm
        self.loss_weights = dict(loss_weights)
        self.logit_scale = 1.0 / temperature
        self.gather: Optional[Gatherer] = None
        for name, needed in (("id", classifier), ("mlm", mlm), ("aux", php is not None and php.efp)):
            if name in self.loss_weights and not needed:
                raise ValueError(f"loss '{name}' needs a module this model does not have")

    @property
    def embed_dim(self) -> int:
        return self.backbone.text_projection.shape[1]

    @property
    def batch_dependent(self) -> bool:
        """True when an embedding depends on its batch mates (the reference's cross-batch EFP attention)."""
        return self.php is not None and self.php.batch_dependent

    def set_efp_attention(self, mode: str) -> None:
        if self.php is not None:
            if mode not in ("tokens", "batch"):
                raise ValueError(f"efp_attention must be 'tokens' or 'batch', got {mode!r}")
            self.php.efp_attention = mode

    def _image(self, images: torch.Tensor):
        tokens = image_tokens(self.backbone, images)
        feats, aux = tokens[:, 0], None
        if self.php is not None:
            part, aux = self.php(tokens[:, 1:], "image")
            feats = feats + part
        return feats, tokens, aux

    def _text(self, ids: torch.Tensor):
        tokens = text_tokens(self.backbone, ids)
        feats, aux = eot_features(tokens, ids), None
        if self.php is not None:
            part, aux = self.php(tokens, "text", padding_mask=ids == 0)
            feats = feats + part
        return feats, tokens, aux

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings, float32 [B, D]."""
        return self._image(images)[0].float()

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings, float32 [B, D]."""
        return self._text(caption_ids)[0].float()

    def reset_expert_usage(self) -> None:
        if self.php is not None:
            self.php.reset_expert_usage()

    def expert_usage(self) -> Dict[str, torch.Tensor]:
        return self.php.expert_usage() if self.php is not None else {}

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        image_feats, image_toks, image_aux = self._image(batch["images"])
        text_feats, _, text_aux = self._text(batch["caption_ids"])
        image_feats, text_feats = image_feats.float(), text_feats.float()
        pids = batch["pids"]
        out: Dict[str, torch.Tensor] = {"temperature": image_feats.new_tensor(1.0 / self.logit_scale)}
        weights = self.loss_weights

        if any(name in weights for name in CONTRASTIVE):
            all_i, all_t, all_p = (self.gather(image_feats, text_feats, pids) if self.gather
                                   else (image_feats, text_feats, pids))
            if "itc" in weights:
                out["itc_loss"] = weights["itc"] * losses.itc_loss(all_i, all_t, self.logit_scale)
            if "sdm" in weights:
                out["sdm_loss"] = weights["sdm"] * losses.sdm_loss(all_i, all_t, all_p, self.logit_scale)
            if "cmpm" in weights:
                out["cmpm_loss"] = weights["cmpm"] * losses.cmpm_loss(all_i, all_t, all_p)
        if "id" in weights:
            image_logits = self.classifier(image_feats)
            text_logits = self.classifier(text_feats)
            out["id_loss"] = weights["id"] * losses.id_loss(image_logits.float(), text_logits.float(), pids)
            out["img_acc"] = (image_logits.argmax(dim=1) == pids).float().mean()
            out["txt_acc"] = (text_logits.argmax(dim=1) == pids).float().mean()
        if "mlm" in weights:
            masked_tokens = text_tokens(self.backbone, batch["mlm_ids"])
            logits, labels = self.mlm(masked_tokens, image_toks, batch["mlm_labels"])
            out["mlm_loss"] = weights["mlm"] * losses.mlm_loss(logits, labels)
            out["mlm_acc"] = ((logits.argmax(dim=1) == labels).float().mean() if labels.numel()
                              else logits.new_zeros(()))
        if "aux" in weights:
            out["aux_loss"] = weights["aux"] * (image_aux + text_aux)
        return out
