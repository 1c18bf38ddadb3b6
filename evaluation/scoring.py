"""From embeddings to scores and metrics: the one place that says how a query and a gallery item are compared.

`retrieval_features` turns a model's raw embeddings into the vectors whose dot product is the similarity (today:
L2-normalised, so the similarity is the cosine); `similarity` scores queries against a gallery; `embedding_metrics`
goes from two embedding sets to the metrics of `evaluation.metrics.retrieval_metrics`. Validation, test.py, the
audit, `sh run.sh test` and the search (retrieve.py, the search page, the gallery cache) all score through them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from evaluation.metrics import retrieval_metrics


def retrieval_features(embeddings: torch.Tensor) -> torch.Tensor:
    """float32 vectors whose dot products are the similarities of the items embedded as `embeddings` [N, D]."""
    return F.normalize(embeddings.float(), dim=-1)


def similarity(query_features: torch.Tensor, gallery_features: torch.Tensor) -> torch.Tensor:
    """[Q, G] scores of retrieval features (queries x gallery), on the queries' device."""
    return query_features @ gallery_features.to(query_features.device).T


def embedding_metrics(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor, text_pids: torch.Tensor,
                      image_pids: torch.Tensor, device: Optional[torch.device] = None,
                      i2t: bool = False) -> Dict[str, dict]:
    """{"t2i": metrics[, "i2t": metrics]} of raw text and image embeddings: features, similarity on `device`
    (default: where the embeddings are), retrieval_metrics; i2t ranks the captions for each image."""
    texts = retrieval_features(text_embeddings.to(device) if device is not None else text_embeddings)
    images = retrieval_features(image_embeddings.to(texts.device))
    with torch.no_grad():
        scores = similarity(texts, images)
        results = {"t2i": retrieval_metrics(scores, text_pids, image_pids)}
        if i2t:
            # A contiguous copy: gathering rows of a transposed view would read the matrix column-wise.
            results["i2t"] = retrieval_metrics(scores.T.contiguous(), image_pids, text_pids)
    return results
