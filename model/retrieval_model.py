"""The retrieval model: the CLIP backbone, its heads (the methods' and plug-ins'), its losses.

Embeddings (SPEC 5, 6): image i = g_v + the embedding heads' features of the patches, text t = g_t + theirs of
the text tokens (g + the head's part; without an embedding head g alone). `model(batch)` returns every active loss
under `<name>_loss`, already weighted, plus diagnostics; the trainer sums the keys that end in `_loss`.

What a loss receives (`out`, a dict) in one training step:
- image_feats, text_feats: the embeddings [B, D], float32; pids [B]; logit_scale (1 / temperature);
- image_tokens [B, 1 + patches, D], text_tokens [B, L, D]: the backbone's projected tokens;
- batch: the batch as the loader gave it (caption_ids, the token inputs and views the losses asked for, ...);
- what the heads add: `<modality>_<key>` side outputs of embedding heads, `<modality>_<name>` embeddings of their
  own, and each head's `outputs` (what its losses need).
A loss registered with `global_batch` sees image_feats, text_feats and pids of every process under DDP.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from open_clip.model import CLIP
from torch import nn

from model.backbone import eot_features, image_tokens, text_tokens
from model.attention import tower_attentions
from model.head import Head, Tower
from model.similarity import DEFAULT, Similarity
from model.registry import HEADS, LossSpec

# {name: tensor of this process's batch} -> the same over every process's batch; see utils/distributed.py.
Gatherer = Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]
# What every global-batch loss sees gathered; a loss declares more keys of `out` with `gathers`.
GLOBAL_KEYS = ("image_feats", "text_feats", "pids")


@dataclass(frozen=True)
class ActiveLoss:
    """A loss of the model: its registered spec, its weight, and the config its function reads its options from."""

    spec: LossSpec
    weight: float
    cfg: Any

    def __call__(self, out: Dict[str, Any]):
        return self.spec.fn(out, self.cfg)


class RetrievalModel(nn.Module):
    def __init__(self, backbone: CLIP, heads: Dict[str, Head], losses: Dict[str, "ActiveLoss"],
                 temperature: float = 0.02):
        super().__init__()
        self.backbone = backbone
        for name in HEADS:
            # A registered head that this model lacks reads as None.
            object.__setattr__(self, name, None)
        for name, head in heads.items():
            setattr(self, name, head)
        self.head_names = list(heads)
        self.losses = dict(losses)
        self.logit_scale = 1.0 / temperature
        self.gather: Optional[Gatherer] = None
        for name, loss in losses.items():
            missing = [h for h in loss.spec.needs if h not in heads]
            if missing:
                raise ValueError(f"loss '{name}' needs the head(s) {', '.join(missing)}, which this model lacks")
        # The last block of each tower keeps its attention probabilities only when a head needs them.
        self.keeps_attention = any(head.needs_attention for head in heads.values())
        for tower in tower_attentions(backbone):
            tower.keep_weights = self.keeps_attention
        self.similarity = declared_similarity(heads)

    @property
    def embedding_widths(self) -> Dict[str, int]:
        """The width of each named embedding ('global' and the heads' own)."""
        widths = {"global": self.embed_dim}
        for head in self.heads.values():
            widths.update(head.embedding_widths())
        return widths

    @property
    def feature_dim(self) -> int:
        """The width of the retrieval features (model/similarity.py)."""
        return self.similarity.width(self.embedding_widths)

    @property
    def heads(self) -> Dict[str, Head]:
        return {name: getattr(self, name) for name in self.head_names}

    @property
    def loss_weights(self) -> Dict[str, float]:
        return {name: loss.weight for name, loss in self.losses.items()}

    @property
    def embed_dim(self) -> int:
        return self.backbone.text_projection.shape[1]

    @property
    def batch_dependent(self) -> bool:
        """True when an embedding depends on its batch mates (a head in a reference release's batch mode)."""
        return any(head.batch_dependent for head in self.heads.values())

    @property
    def mode(self) -> str:
        """The evaluation mode the model runs in: 'none', or the mode of a head that reproduces a reference."""
        return next((head.mode for head in self.heads.values() if head.mode != "none"), "none")

    @property
    def modes(self) -> Tuple[str, ...]:
        """'none' and every mode the model's heads declare."""
        return ("none", *dict.fromkeys(m for head in self.heads.values() for m in head.modes))

    def set_mode(self, mode: str) -> Dict[str, Any]:
        """Run every head in `mode` (a head that does not know it stays as it is: a model without the head of a
        reference mode runs as itself); returns the options that mode means for the run's config."""
        options: Dict[str, Any] = {}
        for head in self.heads.values():
            options.update(head.set_mode(mode))
        return options

    def mode_warning(self) -> str:
        return " ".join(w for w in (head.mode_warning() for head in self.heads.values()) if w)

    def _encode(self, modality: str, inputs: torch.Tensor):
        """(global embedding, tokens, side outputs of the heads, the heads' named embeddings) of images or
        caption ids."""
        if modality == "image":
            tokens = image_tokens(self.backbone, inputs)
            feats, padding, ids = tokens[:, 0], None, None
        else:
            tokens = text_tokens(self.backbone, inputs)
            feats, padding, ids = eot_features(tokens, inputs), inputs == 0, inputs
        side: Dict[str, torch.Tensor] = {}
        for name in self.head_names:
            result = getattr(self, name).embed(tokens, modality, padding)
            if result is not None:
                part, extra = result
                feats = feats + part
                side.update({f"{modality}_{key}": value for key, value in extra.items()})
        named: Dict[str, torch.Tensor] = {}
        if any(type(head).embeddings is not Head.embeddings for head in self.heads.values()):
            attention = tower_attentions(self.backbone)[0 if modality == "image" else 1].weights \
                if self.keeps_attention else None
            tower = Tower(modality, tokens, padding, ids, attention)
            for head in self.heads.values():
                named.update(head.embeddings(tower))
        return feats, tokens, side, named

    def embed(self, modality: str, inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every named embedding of images or caption ids, float32: 'global' and the heads' own."""
        feats, _, _, named = self._encode(modality, inputs)
        return {"global": feats.float(), **{k: v.float() for k, v in named.items()}}

    def features(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Retrieval features [B, feature_dim]: their dot products are the model's similarities."""
        return self.similarity.features(self.embed(modality, inputs))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings, float32 [B, D]."""
        return self._encode("image", images)[0].float()

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings, float32 [B, D]."""
        return self._encode("text", caption_ids)[0].float()

    def reset_reports(self) -> None:
        for head in self.heads.values():
            head.reset_report()

    def reports(self, out_dir: Optional[str] = None) -> Dict[str, Any]:
        """What the heads measured since reset_reports ({record key: value}; model/head.py Head.report)."""
        found: Dict[str, Any] = {}
        for head in self.heads.values():
            found.update(head.report(out_dir))
        return found

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        image_feats, image_toks, image_side, image_named = self._encode("image", batch["images"])
        text_feats, text_toks, text_side, text_named = self._encode("text", batch["caption_ids"])
        out: Dict[str, Any] = {"image_feats": image_feats.float(), "text_feats": text_feats.float(),
                               "pids": batch["pids"], "image_tokens": image_toks, "text_tokens": text_toks,
                               "logit_scale": self.logit_scale, "batch": batch, **image_side, **text_side,
                               **{f"image_{k}": v.float() for k, v in image_named.items()},
                               **{f"text_{k}": v.float() for k, v in text_named.items()}}
        for head in self.heads.values():
            out.update(head.outputs(out, self))
        return self.compute_losses(out)

    def compute_losses(self, out: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Every active loss, weighted, as `<name>_loss`, and the diagnostics the losses return, all float32.

        The losses run with autocast off: their cosine matrices, scaled by 1 / temperature (50), lose 1-2% of the
        gradient in bf16, and the references compute them in fp32.
        """
        image_feats = out["image_feats"]
        # torch.full, not new_tensor: a fill on the device rather than a copy from the host, which on CUDA waits.
        scale = out["logit_scale"]  # a head may learn its own (TBPS-CLIP's)
        results: Dict[str, torch.Tensor] = {"temperature": 1.0 / scale.detach().float() if torch.is_tensor(scale)
                                            else torch.full((), 1.0 / scale, device=image_feats.device)}
        gathered: Dict[str, Any] = {}
        device = image_feats.device.type
        # (The meta device, used to check shapes, has no autocast to turn off.)
        off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
        with off:
            for name, loss in self.losses.items():
                view = out
                if loss.spec.global_batch and self.gather is not None:
                    keys = [k for k in (*GLOBAL_KEYS, *loss.spec.gathers) if k not in gathered and k in out]
                    if keys:
                        gathered.update(self.gather({k: out[k] for k in keys}))
                    view = {**out, **gathered}
                value = loss(view)
                if isinstance(value, dict):
                    results.update({k: v.detach().float() for k, v in value.items() if k != "loss"})
                    value = value["loss"]
                results[f"{name}_loss"] = loss.weight * value.float()
        return results


def declared_similarity(heads: Dict[str, Head]) -> Similarity:
    """The similarity the heads declare (model/similarity.py): at most one head declares one; the cosine of the
    global embedding otherwise."""
    declared = [(name, head.similarity()) for name, head in heads.items() if head.similarity() is not None]
    if len(declared) > 1:
        raise ValueError(f"heads {', '.join(n for n, _ in declared)} each declare a similarity; one may")
    return Similarity.of(declared[0][1]) if declared else DEFAULT
