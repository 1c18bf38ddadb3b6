"""RDE's CCD, consensus division (SPEC 12): before every epoch, which training pairs to learn from.

Every training pair's TAL loss is computed, in eval mode, for the global embedding (BGE) and for TSE's, over the
whole training set as the epoch will draw it (augmented; batches of the training batch size, in an order of their
own, so each loss depends on the batch mates it falls among, as in the reference). Each set of losses is min-max
normalised and a two-component Gaussian mixture is fitted to it (scikit-learn; max_iter 10, tol 1e-2, reg_covar
5e-4, or max_iter 100, tol 1e-4, reg_covar 1e-6 when the noise rate is above 0.4 or on RSTPReid; the rate is
noisy_rate, or with a noisy_file the share of the pairs that the file gives another pair's caption). A pair is
clean for an embedding when the posterior of the lower-mean component exceeds 0.5 (when all do, the 1st percentile
of the posteriors is the threshold instead). Clean for both: label 1; for neither: 0; for one: a fair coin. The
labels are the sample weights `ccd` that the `tal` loss reads for the epoch. A training split of one identity is
refused before the run starts: TAL has no negatives there, and every pair would be dropped.

Departures, each deliberate: the mixture is fitted with a fixed random_state and the coin is drawn from (seed,
epoch), so a run and its resume choose the same pairs (the reference draws both unseeded); the selection pass
computes under the run's autocast precision rather than a model cast to fp16.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from processor.callbacks import EpochCallback, EpochContext, register_callback
from utils.env import autocast
from utils.errors import UserError

from .tal import tal_per_sample
from . import LOSS, SELECTION


def per_sample_losses(ctx: EpochContext) -> torch.Tensor:
    """[N, 2] TAL of every training pair for BGE and TSE, in eval mode, gathered from every process."""
    ctx.model.eval()
    indices, values = [], []
    with torch.inference_mode():
        for batch in ctx.training_set():
            values.append(batch_losses(ctx.model, ctx.cfg, batch, ctx.device).float().cpu())
            indices.append(batch["indices"])
    return ctx.gather(torch.cat(indices), torch.cat(values))


def batch_losses(model, cfg, batch, device: torch.device) -> torch.Tensor:
    """[B, 2] TAL of one batch's pairs for BGE and TSE (the caller sets eval and inference mode)."""
    images = batch["images"].to(device, non_blocking=True)
    ids = batch["caption_ids"].to(device, non_blocking=True)
    pids = batch["pids"].to(device, non_blocking=True)
    with autocast(device, cfg.precision):
        image, text = model.embed("image", images), model.embed("text", ids)
    return torch.stack([tal_per_sample(image[k], text[k], pids, cfg.tau, cfg.margin)
                        for k in ("global", "tse")], dim=1)


def clean_probability(losses: np.ndarray, strong: bool) -> np.ndarray:
    """Posterior of the lower-mean component of a two-component GMM on the min-max normalised losses."""
    from sklearn.mixture import GaussianMixture
    spread = losses.max() - losses.min()
    normalised = (losses - losses.min()) / (spread if spread > 0 else 1.0)
    settings = dict(max_iter=100, tol=1e-4, reg_covar=1e-6) if strong else dict(max_iter=10, tol=1e-2, reg_covar=5e-4)
    gmm = GaussianMixture(n_components=2, random_state=0, **settings)
    column = normalised.reshape(-1, 1).astype(np.float64)
    gmm.fit(column)
    return gmm.predict_proba(column)[:, int(np.argmin(gmm.means_[:, 0]))]


def split(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """clean = p > threshold; when every p is above it, the 1st percentile of p is the threshold instead."""
    if probability.min() > threshold:
        threshold = np.sort(probability)[len(probability) // 100]
    return probability > threshold


def consensus(clean_bge: np.ndarray, clean_tse: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """1 where both call a pair clean, 0 where neither does, a fair coin where they disagree."""
    votes = torch.from_numpy(clean_bge.astype(np.int64) + clean_tse.astype(np.int64))
    coin = torch.randint(0, 2, votes.shape, generator=generator)
    return ((votes + torch.where(votes == 1, coin, torch.zeros_like(coin))) > 1).float()


def selection_report(labels: torch.Tensor, clean) -> Dict[str, float]:
    """Share of pairs kept; with the truth known, the precision and recall of the kept ones."""
    kept = labels.bool().numpy()
    report = {"kept": round(float(kept.mean()), 6)}
    if clean is not None:
        hits = float(np.logical_and(kept, clean).sum())
        report["precision"] = round(hits / max(float(kept.sum()), 1.0), 6)
        report["recall"] = round(hits / max(float(clean.sum()), 1.0), 6)
        report["clean_share"] = round(float(np.mean(clean)), 6)
    return report


def noise_rate(cfg, clean: Optional[np.ndarray]) -> float:
    """The noise rate the run trains at: noisy_rate, or with a noisy_file (which decides alone what is applied,
    noisy_rate 0 included) the share of the pairs it gave another pair's caption (`clean`: pi(i) = i)."""
    if cfg.noisy_file and clean is not None and len(clean):
        return float(np.mean(~np.asarray(clean, dtype=bool)))
    return float(cfg.noisy_rate)


def enabled(cfg) -> bool:
    return LOSS in cfg.losses and cfg.rde_ccd


def check_training_split(cfg, dataset) -> None:
    """Refuse a training split that CCD cannot divide: with one identity every pair of a batch is a positive, TAL
    is 0 for all of them, and the mixture fit keeps none (the run would train on nothing and still succeed)."""
    if not enabled(cfg):
        return
    pids = {pair[0] for pair in dataset.train}
    if len(pids) < 2:
        source = getattr(dataset, "annotation_file", None) or cfg.dataset_name
        what = f"a single identity ({len(dataset.train)} pairs)" if pids else "no pairs"
        raise UserError(f"{source}: the training split holds {what}; RDE's consensus division (rde_ccd) needs at "
                        f"least 2 identities, since TAL learns only against other identities' pairs")


# Its option, rde_ccd, is the tal loss's (model/tal.py): evaluating a run must know it without the trainer.
@register_callback(SELECTION, enabled=enabled, check=check_training_split)
class ConsensusDivision(EpochCallback):
    def on_epoch_start(self, ctx: EpochContext) -> Dict[str, float]:
        cfg = ctx.cfg
        losses = per_sample_losses(ctx).double().numpy()
        strong = noise_rate(cfg, ctx.clean) > 0.4 or cfg.dataset_name == "RSTPReid"
        clean_bge, clean_tse = (split(clean_probability(losses[:, k], strong)) for k in (0, 1))
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, ctx.epoch, 0xCCD])
                                                     .generate_state(1)[0]))
        labels = consensus(clean_bge, clean_tse, generator)
        ctx.set_sample_weights(SELECTION, labels)
        report = selection_report(labels, ctx.clean)
        report.update(bge_clean=round(float(clean_bge.mean()), 6), tse_clean=round(float(clean_tse.mean()), 6))
        return report
