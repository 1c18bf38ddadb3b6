"""Retrieval metrics (CMC rank-k, mAP, mINP) computed exactly, in bounded memory, without sorting the gallery.

The common implementation argsorts the whole [Q, G] similarity matrix, which at ICFG-PEDES test size (19,848 x
19,848) costs about a minute and several GB. Only the ranks of the relevant gallery items enter the metrics, and
the rank of an item is one plus the number of items scored above it. So, for each chunk of queries, the scores of
the relevant items are gathered (a few per query), sorted, and every gallery score is compared against them:
the counts give every relevant item's rank exactly, and no sort of the gallery is needed.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Dict, Iterator, Mapping, Optional, Tuple

import prettytable
import torch

from utils.errors import UserError

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
DIRECTIONS = ("t2i", "i2t")

# Bytes of the comparison temporaries: a few MB on CPU so they stay in cache, more on GPU to keep it busy.
_WORK_BYTES = {"cpu": 6 << 20, "other": 256 << 20}
# Queries whose relevant scores are gathered and turned into metrics together (bookkeeping only), and the
# most (query, relevant item) pairs such a chunk may hold.
_CHUNK_QUERIES = {"cpu": 2048, "other": 8192}
_CHUNK_PAIRS = 1 << 20
# Comparisons (query rows x relevant items x gallery) per CPU task: a few milliseconds of work.
_TASK_COMPARISONS = 16 << 20
# Above this many relevant items per query, one binary search per score beats one comparison per relevant item.
_MAX_COMPARE_THRESHOLDS = 128


def _check_inputs(similarity, query_pids, gallery_pids, max_rank, chunk_size) -> None:
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or not similarity.is_floating_point():
        got = (f"{tuple(similarity.shape)} {similarity.dtype}" if isinstance(similarity, torch.Tensor)
               else type(similarity).__name__)
        raise UserError(f"similarity: expected a 2-D floating-point tensor [num_queries, num_gallery], got {got}")
    for name, pids, n, what in (("query_pids", query_pids, similarity.shape[0], "num_queries = similarity rows"),
                                ("gallery_pids", gallery_pids, similarity.shape[1],
                                 "num_gallery = similarity columns")):
        if (not isinstance(pids, torch.Tensor) or pids.dim() != 1 or pids.is_floating_point()
                or pids.is_complex() or pids.dtype == torch.bool):
            got = f"{tuple(pids.shape)} {pids.dtype}" if isinstance(pids, torch.Tensor) else type(pids).__name__
            raise UserError(f"{name}: expected a 1-D integer tensor, got {got}")
        if pids.numel() != n:
            raise UserError(f"{name}: expected {n} entries ({what}), got {pids.numel()}")
    if similarity.numel() == 0:
        raise UserError(f"similarity: empty matrix {tuple(similarity.shape)}; need at least one query and one "
                        "gallery item")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 10:
        raise UserError(f"max_rank: expected an integer >= 10 (R1, R5 and R10 are always reported), got {max_rank!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise UserError(f"chunk_size: expected a positive integer or None, got {chunk_size!r}")


def _count_by_compare(rows: torch.Tensor, thresholds: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """[c, M] int64: how many entries of each row of `rows` [c, G] are >= each of the row's `thresholds` [c, M].

    `buffer` is float32 scratch space with room for c * M * G entries. Comparing into float32 (1.0 / 0.0) is
    vectorised on CPU, several times faster than into bool, and a float32 sum of ones is exact below 2**24.
    """
    c, num_cols = rows.shape
    hits = buffer[:c * thresholds.shape[1] * num_cols].view(c, thresholds.shape[1], num_cols)
    torch.ge(rows.unsqueeze(1), thresholds.unsqueeze(2), out=hits)
    return hits.sum(2, dtype=torch.float32 if num_cols < 2 ** 24 else torch.float64).long()


def _count_by_search(rows: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Same result as `_count_by_compare`, in time independent of the number of thresholds.

    Bucket of a score = how many thresholds are <= it (a binary search); a threshold's count is the number of
    scores whose bucket reaches it.
    """
    c = rows.shape[0]
    num_thr = thresholds.shape[1]
    ascending = thresholds.flip(1).contiguous()
    bucket = torch.searchsorted(ascending, rows.contiguous(), right=True)
    bucket += torch.arange(c, device=rows.device).unsqueeze(1) * (num_thr + 1)
    hist = torch.bincount(bucket.view(-1), minlength=c * (num_thr + 1)).view(c, num_thr + 1)
    at_least_ascending = hist.flip(1).cumsum(1).flip(1)[:, 1:]
    return at_least_ascending.flip(1)


def _count_rows(similarity: torch.Tensor, queries: torch.Tensor, thresholds: torch.Tensor,
                compute_dtype: torch.dtype, work_bytes: int, scratch: Dict[int, torch.Tensor]) -> torch.Tensor:
    """[n, M] int64: scores of similarity row `queries[i]` that are >= `thresholds[i, k]`, a few rows at a time.

    `scratch` keeps one reusable buffer per thread (allocating megabytes per call costs page faults).
    """
    num_gallery = similarity.shape[1]
    width = thresholds.shape[1]
    compare = width <= _MAX_COMPARE_THRESHOLDS
    step = max(1, min(len(queries), work_bytes // ((4 * width if compare else 8) * num_gallery)))
    if compare:
        buffer = scratch.get(threading.get_ident())
        if buffer is None or buffer.numel() < step * width * num_gallery:
            buffer = torch.empty(step * width * num_gallery, dtype=torch.float32, device=similarity.device)
            scratch[threading.get_ident()] = buffer
    out = torch.empty(thresholds.shape, dtype=torch.long, device=similarity.device)
    for first in range(0, len(queries), step):
        part = slice(first, first + step)
        rows = similarity.index_select(0, queries[part]).to(compute_dtype)
        if torch.isnan(rows.amax()):  # amax propagates NaN: one cheap pass
            bad = queries[part][torch.isnan(rows).any(1)][0].item()
            raise UserError(f"similarity: NaN score in row {bad}; the embeddings are not finite")
        if compare:
            out[part] = _count_by_compare(rows, thresholds[part], buffer)
        else:
            out[part] = _count_by_search(rows, thresholds[part])
    return out


@contextmanager
def _cpu_workers(device: torch.device) -> Iterator[Optional[ThreadPoolExecutor]]:
    """One Python thread per torch CPU thread, each running single-threaded ops; None on GPU or one thread.

    The counting is thousands of small ops. Split over torch's own threads, every op waits for all of them, and
    on a busy machine one descheduled thread stalls each op (2-core dev box under load, ICFG size: 6 to 60 s
    with 2 torch threads, 1.7 s with one). Independent workers just slow down. torch releases the GIL in ops.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        yield None
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def retrieval_metrics(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                      max_rank: int = 10, chunk_size: Optional[int] = None) -> Dict[str, float]:
    """CMC rank-k, mAP and mINP (percent) of ranking the gallery by descending similarity for every query.

    Args:
        similarity: float [Q, G] scores, on CPU or GPU (any float dtype; half types are compared in float32,
            which is exact).
        query_pids: integer [Q] identity of each query.
        gallery_pids: integer [G] identity of each gallery item. A gallery item is relevant to a query when the
            identities are equal.
        max_rank: at least 10. R1, R5 and R10 are always returned; a larger value adds `R<max_rank>`.
        chunk_size: at most this many queries have their relevant items ranked together (None: 2048 on CPU,
            8192 on GPU, fewer when queries have many relevant items). Memory hardly depends on it: the scores
            are compared a few rows at a time, in temporaries of about 6 MB on CPU and 256 MB on GPU.

    Returns:
        `R1`, `R5`, `R10` (percent of queries whose best relevant item is within the top k), `mAP` (mean over
        queries of the mean, over relevant items, of precision at the item's rank), `mINP` (mean of
        number of relevant items / rank of the last relevant item), all python floats in percent;
        `num_queries`: the queries that have at least one relevant gallery item (the ones averaged);
        `num_queries_without_match`: the others, left out of every mean.

    Ties: exact ties are ranked pessimistically. A non-relevant item whose score equals a relevant item's score
    counts as ranked before it; relevant items tied with each other take consecutive ranks (which one gets which
    does not change any metric). This equals a full sort of each row by (score descending, non-relevant before
    relevant, gallery index). A constant similarity therefore scores R1 = 0 instead of rewarding gallery order.
    With real-valued scores ties are rare, and then the result equals any full descending sort.

    Threads: on CPU the work is spread over `torch.get_num_threads()` Python threads while torch itself is set
    to one thread; the setting is restored on return.

    Raises:
        UserError: malformed inputs (names the argument), a NaN score, or no query with a relevant item.
    """
    _check_inputs(similarity, query_pids, gallery_pids, max_rank, chunk_size)
    device = similarity.device
    layout = _RelevantItems(query_pids.to(device=device, dtype=torch.long),
                            gallery_pids.to(device=device, dtype=torch.long))
    if layout.matched.numel() == 0:
        raise UserError("query_pids: no query identity occurs in gallery_pids, so no metric is defined; "
                        "queries and gallery must come from the same split")
    compute_dtype = torch.float32 if similarity.dtype in (torch.float16, torch.bfloat16) else similarity.dtype
    kind = "cpu" if device.type == "cpu" else "other"
    ks = sorted({1, 5, 10, max_rank})
    hits = torch.zeros(len(ks), dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    scratch: Dict[int, torch.Tensor] = {}
    with _cpu_workers(device) as pool:
        for queries, width in layout.chunks(chunk_size or _CHUNK_QUERIES[kind]):
            ranks, counts, valid = _chunk_ranks(similarity, layout, queries, width, compute_dtype, kind, pool,
                                                scratch)
            hits += torch.stack([(ranks[:, 0] <= k).sum() for k in ks]).to(torch.float64)
            slots = torch.arange(width, device=device)
            ap_sum += ((slots + 1).to(torch.float64) / ranks * valid).sum(1).div(counts).sum()
            last = ranks.gather(1, (counts.long() - 1).unsqueeze(1)).squeeze(1)
            inp_sum += (counts / last).sum()
    return _summary(hits, ks, ap_sum, inp_sum, layout.matched.numel(), similarity.shape[0], max_rank)


class _RelevantItems:
    """Where each query's relevant gallery items are: one contiguous run of the gallery sorted by identity."""

    def __init__(self, query_pids: torch.Tensor, gallery_pids: torch.Tensor):
        self.num_gallery = gallery_pids.numel()
        self.gallery_order = torch.argsort(gallery_pids, stable=True)
        identities, identity_counts = torch.unique_consecutive(gallery_pids[self.gallery_order], return_counts=True)
        self.identity_starts = torch.cumsum(identity_counts, 0) - identity_counts
        self.slot = torch.searchsorted(identities, query_pids).clamp_max(identities.numel() - 1)
        found = identities[self.slot] == query_pids
        self.num_relevant = torch.where(found, identity_counts[self.slot], torch.zeros_like(self.slot))
        # Queries in decreasing order of relevant count: a chunk then pads little and its first row sets its size.
        matched = torch.nonzero(self.num_relevant > 0).squeeze(1)
        self.matched = matched[torch.argsort(self.num_relevant[matched], descending=True, stable=True)]

    def chunks(self, chunk_rows: int) -> Iterator[Tuple[torch.Tensor, int]]:
        """(queries, the largest relevant count among them) per chunk, at most _CHUNK_PAIRS pairs each."""
        relevant_sorted = self.num_relevant[self.matched].tolist()
        start = 0
        while start < len(relevant_sorted):
            width = relevant_sorted[start]
            queries = self.matched[start:start + min(chunk_rows, max(1, _CHUNK_PAIRS // width))]
            start += len(queries)
            yield queries, width


def _chunk_ranks(similarity, layout: _RelevantItems, queries, width: int, compute_dtype, kind: str, pool,
                 scratch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank of each query's k-th relevant item [q, width] float64, relevant counts float64, valid slots)."""
    device = similarity.device
    counts = layout.num_relevant[queries]
    slots = torch.arange(width, device=device)
    valid = slots.unsqueeze(0) < counts.unsqueeze(1)
    position = (layout.identity_starts[layout.slot[queries]].unsqueeze(1) + slots).clamp_max(layout.num_gallery - 1)
    relevant_scores = similarity[queries.unsqueeze(1), layout.gallery_order[position]].to(compute_dtype)
    relevant_scores = relevant_scores.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True)[0]

    # How many scores are >= each relevant score, and how many of those are relevant (ties included; the -inf
    # padding sorts last and is cut off by the count).
    if pool is None:
        at_least = _count_rows(similarity, queries, relevant_scores, compute_dtype, _WORK_BYTES[kind], scratch)
    else:
        task = max(1, _TASK_COMPARISONS // (width * layout.num_gallery))
        parts = [slice(i, i + task) for i in range(0, len(queries), task)]
        at_least = torch.cat(list(pool.map(
            lambda p: _count_rows(similarity, queries[p], relevant_scores[p], compute_dtype, _WORK_BYTES[kind],
                                  scratch), parts)))
    negated = -relevant_scores  # ascending
    relevant_at_least = torch.minimum(torch.searchsorted(negated, negated, right=True), counts.unsqueeze(1))
    # The k-th relevant item (1-based) follows k - 1 relevant items and every non-relevant one scored >= it.
    ranks = ((slots + 1).unsqueeze(0) + (at_least - relevant_at_least)).to(torch.float64)
    return ranks, counts.to(torch.float64), valid


def _summary(hits, ks, ap_sum, inp_sum, num_matched: int, num_queries: int, max_rank: int) -> Dict[str, float]:
    scale = 100.0 / num_matched
    hit_rates = {f"R{k}": float(h) * scale for k, h in zip(ks, hits.tolist())}
    results = {key: hit_rates[key] for key in ("R1", "R5", "R10")}
    if max_rank > 10:
        results[f"R{max_rank}"] = hit_rates[f"R{max_rank}"]
    results["mAP"] = float(ap_sum) * scale
    results["mINP"] = float(inp_sum) * scale
    results["num_queries"] = num_matched
    results["num_queries_without_match"] = num_queries - num_matched
    return results


def format_table(results_by_task: Mapping[str, object]) -> prettytable.PrettyTable:
    """Table with columns task, R1, R5, R10, mAP, mINP (two decimals), one row per direction ('t2i', 'i2t').

    Entries of `results_by_task` that are not metric dicts (e.g. `num_queries`) are skipped.
    """
    table = prettytable.PrettyTable(["task", *METRIC_KEYS])
    tasks = [t for t in DIRECTIONS if t in results_by_task]
    tasks += [t for t, v in results_by_task.items() if t not in DIRECTIONS and isinstance(v, Mapping) and "R1" in v]
    for task in tasks:
        metrics = results_by_task[task]
        table.add_row([task, *(f"{float(metrics[key]):.2f}" for key in METRIC_KEYS)])
    return table
