"""`embed_loaders`: the one function that turns image and caption batches into embeddings.

Training's validation, test.py, the batch-independence audit, the gallery cache of retrieve.py and
`sh run.sh test` all embed through it, so they agree on eval mode, autocast, expert-usage counts and output
format, and a change to how a model is run for evaluation is made here once.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import torch
from tqdm import tqdm

from evaluation.scoring import retrieval_features
from model.similarity import raw_embeddings
from utils.env import PRECISIONS, autocast, runtime_precision
from utils.errors import UserError

# Per input kind: the batch key holding the model's input, the encoder method, and the name used in messages.
_KINDS = {"image": ("images", "encode_image", "images"), "text": ("caption_ids", "encode_text", "captions")}


def check_precision(precision: str) -> str:
    """The precision the encoders run in for `precision` ('auto', which a trained run never records, is fp32: see
    utils.env.runtime_precision); a UserError naming any other value."""
    precision = runtime_precision(precision)
    if precision not in PRECISIONS:
        raise UserError(f"precision: expected one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
    return precision


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encoder(model: torch.nn.Module, kind: str, normalize: bool, keep_raw: bool):
    """inputs -> (what embed_loaders returns for them: retrieval features or raw embeddings, the raw embeddings
    too when `keep_raw`). A RetrievalModel gives its named embeddings and its similarity's features; any other
    encoder (encode_image / encode_text, e.g. a test's) is taken as one 'global' embedding, cosine-scored."""
    _, method, _ = _KINDS[kind]
    if hasattr(model, "embed") and hasattr(model, "similarity"):
        def encode(inputs):
            named = model.embed(kind, inputs)
            raw = raw_embeddings(named) if (keep_raw or not normalize) else None
            return (model.similarity.features(named) if normalize else raw), raw
        return encode
    if normalize and hasattr(model, "features"):
        return lambda inputs: (model.features(kind, inputs), None)
    plain = getattr(model, method)

    def encode_plain(inputs):
        out = plain(inputs).float()
        return (retrieval_features(out) if normalize else out), (out if keep_raw else None)
    return encode_plain


def _embed_one(model: torch.nn.Module, loader: Iterable, kind: str, device: torch.device, precision: str,
               normalize: bool, desc: str, keep_raw: bool = False):
    """Per-batch float32 CPU embeddings, raw embeddings (when kept) and pids of one loader."""
    key, _, what = _KINDS[kind]
    encode = _encoder(model, kind, normalize, keep_raw)
    feats, raws, pids = [], [], []
    for batch in tqdm(loader, desc=f"{desc} {what}", disable=None, leave=False):
        if not isinstance(batch, Mapping) or key not in batch or "pids" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise UserError(f"{what} loader: expected dict batches with keys 'pids' and '{key}', got {got}")
        batch_pids = torch.as_tensor(batch["pids"]).long().reshape(-1).cpu()
        with autocast(device, precision):
            out, raw = encode(batch[key].to(device, non_blocking=True))
        if out.dim() != 2 or out.shape[0] != batch_pids.numel():
            raise UserError(f"{what} loader: a batch of {batch_pids.numel()} pids gave embeddings of shape "
                            f"{tuple(out.shape)}; expected [{batch_pids.numel()}, D]")
        feats.append(out.float().cpu())
        if raw is not None:
            raws.append(raw.float().cpu())
        pids.append(batch_pids)
    if not feats:
        raise UserError(f"{what} loader: yielded no batches; the split has no {what}")
    return feats, raws, pids


def embed_loaders(model: torch.nn.Module, images: Optional[Iterable] = None, texts: Optional[Iterable] = None, *,
                  precision: str = "fp32", normalize: bool = True, desc: str = "eval",
                  keep_raw: bool = False) -> Dict[str, torch.Tensor]:
    """Float32 CPU embeddings of every batch of `images` and of `texts`, in loader order, with their pids.

    `images` yields `{"pids": [B], "images": [B, 3, H, W]}` and gives `image_feats` [N, D] and `image_pids` [N];
    `texts` yields `{"pids": [B], "caption_ids": [B, L]}` and gives `text_feats` and `text_pids`; either may be
    None. Embeddings are retrieval features (model/similarity.py: the cosine of the global embedding, or the method's
    declared similarity) unless `normalize=False` (every named embedding, raw, side by side); `keep_raw` adds those
    as `image_raw` / `text_raw` beside the features. The model runs in
    eval mode under `torch.inference_mode()` on its own device, under autocast for "bf16" / "fp16"; every
    module's train/eval mode is restored afterwards. `model.reset_reports()`, when the model has it, is called
    first, so what the heads measure (model/head.py Head.report) covers exactly this call. A malformed batch, an encoder output that does
    not fit its batch, or an empty loader is a UserError naming the loader.
    """
    precision = check_precision(precision)
    device = model_device(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        reset = getattr(model, "reset_reports", None)
        if callable(reset):
            reset()
        with torch.inference_mode():
            parts = {kind: _embed_one(model, loader, kind, device, precision, normalize, desc, keep_raw)
                     for kind, loader in (("image", images), ("text", texts)) if loader is not None}
    finally:
        for module, training in modes:
            module.training = training
    # Concatenated outside inference mode: callers get ordinary tensors they may modify in place.
    out = {}
    for kind, (feats, raws, pids) in parts.items():
        out[f"{kind}_feats"], out[f"{kind}_pids"] = torch.cat(feats), torch.cat(pids)
        if keep_raw:
            out[f"{kind}_raw"] = torch.cat(raws)
    return out
