"""From embeddings to scores and metrics: the one place that says how a query and a gallery item are compared.

Every model gives retrieval features, vectors whose dot product is its similarity (model/similarity.py: the cosine
of its global embedding, or the weighted cosines its heads declare); `similarity` scores queries against a
gallery by that product; `feature_metrics` goes from two feature sets to the metrics of
`evaluation.metrics.retrieval_metrics`. Validation, test.py, the
audit, `sh run.sh test` and the search (retrieve.py, the search page, the gallery cache) all score through them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from evaluation.metrics import retrieval_metrics


def retrieval_features(embeddings: torch.Tensor) -> torch.Tensor:
    """The retrieval features of one plain embedding [N, D] (an encoder that is no RetrievalModel): L2-normalised,
    so that their dot products are cosines. A RetrievalModel gives its own (`features`, model/similarity.py)."""
    return F.normalize(embeddings.float(), dim=-1)


def similarity(query_features: torch.Tensor, gallery_features: torch.Tensor) -> torch.Tensor:
    """[Q, G] scores of retrieval features (queries x gallery), on the queries' device."""
    return query_features @ gallery_features.to(query_features.device).T


def feature_metrics(text_features: torch.Tensor, image_features: torch.Tensor, text_pids: torch.Tensor,
                    image_pids: torch.Tensor, device: Optional[torch.device] = None,
                    i2t: bool = False) -> Dict[str, dict]:
    """{"t2i": metrics[, "i2t": metrics]} of the retrieval features of captions and images: their similarity on
    `device` (default: where the features are), then retrieval_metrics; i2t ranks the captions for each image."""
    texts = text_features.to(device) if device is not None else text_features
    with torch.no_grad():
        scores = similarity(texts, image_features)
        results = {"t2i": retrieval_metrics(scores, text_pids, image_pids)}
        if i2t:
            # A contiguous copy: gathering rows of a transposed view would read the matrix column-wise.
            results["i2t"] = retrieval_metrics(scores.T.contiguous(), image_pids, text_pids)
    return results
