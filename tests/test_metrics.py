"""retrieval_metrics: hand-computed cases, ties, input checks, and agreement with a plain full-sort computation."""
import math

import pytest
import torch

import evaluation.metrics as metrics_module
from evaluation.metrics import format_table, retrieval_metrics
from utils.errors import UserError

KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def full_sort_metrics(similarity, query_pids, gallery_pids, max_rank=10):
    """The classic computation: sort each whole row, mark matches, cumulative sums give CMC, AP and INP.

    Ties follow the documented rule: sort by score descending, non-relevant before relevant, then gallery index.
    """
    matches_all = query_pids[:, None] == gallery_pids[None, :]
    # Two stable sorts: by relevance (non-relevant first, index order kept), then by score descending.
    by_relevance = torch.sort(matches_all.to(torch.uint8), dim=1, stable=True).indices
    by_score = torch.sort(similarity.gather(1, by_relevance), dim=1, descending=True, stable=True).indices
    order = by_relevance.gather(1, by_score)
    matches = (gallery_pids[order] == query_pids[:, None]).double()
    keep = matches.sum(1) > 0
    matches = matches[keep]
    cum = matches.cumsum(1)
    positions = torch.arange(1, matches.shape[1] + 1, dtype=torch.float64)
    cmc = (cum > 0).double().mean(0) * 100
    ap = (cum / positions * matches).sum(1) / matches.sum(1)
    last = matches.shape[1] - matches.flip(1).argmax(1)
    inp = matches.sum(1) / last
    out = {f"R{k}": float(cmc[min(k, matches.shape[1]) - 1]) for k in sorted({1, 5, 10, max_rank})}
    out.update(mAP=float(ap.mean() * 100), mINP=float(inp.mean() * 100), num_queries=int(keep.sum()),
               num_queries_without_match=int((~keep).sum()))
    return out


def assert_same(got, want, tol=1e-9):
    assert got["num_queries"] == want["num_queries"]
    assert got["num_queries_without_match"] == want["num_queries_without_match"]
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_query_without_match_is_excluded_and_counted():
    sim = t([[0.9, 0.1, 0.2], [0.5, 0.6, 0.7], [0.3, 0.2, 0.1]])
    out = retrieval_metrics(sim, t([1, 9, 2], torch.long), t([1, 2, 3], torch.long))
    # Query 0: its only match is first -> AP 1, INP 1. Query 2: match (score 0.2) ranked 2nd -> AP 1/2, INP 1/2.
    assert out["num_queries"] == 2 and out["num_queries_without_match"] == 1
    assert out["R1"] == pytest.approx(50.0) and out["R5"] == pytest.approx(100.0)
    assert out["mAP"] == pytest.approx(75.0) and out["mINP"] == pytest.approx(75.0)
    assert all(isinstance(out[k], float) for k in KEYS)


def test_matches_all_ranked_last():
    sim = t([[0.9, 0.8, 0.1, 0.05]])
    out = retrieval_metrics(sim, t([1], torch.long), t([5, 6, 1, 1], torch.long))
    # Relevant at ranks 3 and 4: AP = (1/3 + 2/4) / 2, INP = 2 / 4.
    assert out["R1"] == 0.0 and out["R5"] == 100.0 and out["R10"] == 100.0
    assert out["mAP"] == pytest.approx(100 * (1 / 3 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(50.0)


def test_several_relevant_items_by_hand():
    # Descending order of the scores: g3(rel) g0 g4(rel) g1 g5 g2(rel) -> relevant ranks 1, 3, 6.
    sim = t([[0.8, 0.5, 0.1, 0.95, 0.7, 0.3]])
    out = retrieval_metrics(sim, t([4], torch.long), t([0, 1, 4, 4, 4, 2], torch.long))
    assert out["R1"] == 100.0
    assert out["mAP"] == pytest.approx(100 * (1 / 1 + 2 / 3 + 3 / 6) / 3)
    assert out["mINP"] == pytest.approx(100 * 3 / 6)


def test_ties_are_pessimistic():
    pids = t([7, 1, 1], torch.long)
    # A non-relevant item tied with a relevant one is ranked before it: relevant ranks 2 and 3, not 1 and 3.
    out = retrieval_metrics(t([[0.5, 0.5, 0.3]]), t([1], torch.long), pids)
    assert out["R1"] == 0.0
    assert out["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert out["mINP"] == pytest.approx(100 * 2 / 3)
    # Relevant items tied with each other take consecutive ranks (2 and 3 behind g2).
    out = retrieval_metrics(t([[0.9, 0.4, 0.4]]), t([1], torch.long), pids)
    assert out["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    # A constant similarity gets no credit for gallery order.
    out = retrieval_metrics(torch.zeros(2, 4), t([3, 4], torch.long), t([3, 4, 5, 6], torch.long))
    assert out["R1"] == 0.0 and out["mAP"] == pytest.approx(25.0)
    # -0.0 == +0.0 is a tie too.
    out = retrieval_metrics(t([[-0.0, 0.0]]), t([1], torch.long), t([1, 2], torch.long))
    assert out["R1"] == 0.0 and out["mINP"] == pytest.approx(50.0)


def test_infinite_scores_rank_like_numbers():
    inf = float("inf")
    sim = t([[inf, inf, 1.0, -inf, -inf], [-inf, 0.5, 0.2, 0.1, 3.0]])
    out = retrieval_metrics(sim, t([1, 2], torch.long), t([2, 1, 1, 3, 1], torch.long))
    # Query 0, order g0 (non-relevant inf first), g1, g2, g3 (non-relevant -inf first), g4: relevant ranks 2, 3, 5.
    # Query 1: its one relevant item (-inf) comes after all four others: rank 5.
    assert out["mAP"] == pytest.approx(100 * ((1 / 2 + 2 / 3 + 3 / 5) / 3 + 1 / 5) / 2)
    assert out["mINP"] == pytest.approx(100 * (3 / 5 + 1 / 5) / 2)


def test_max_rank_and_dtypes():
    gen = torch.Generator().manual_seed(3)
    sim = (torch.randn(20, 30, generator=gen) * 8).round() / 8  # exactly representable in half types
    qp, gp = torch.randint(0, 6, (20,), generator=gen), torch.randint(0, 6, (30,), generator=gen)
    base = retrieval_metrics(sim, qp, gp, max_rank=20)
    assert_same(base, full_sort_metrics(sim, qp, gp, max_rank=20))
    assert "R20" in base
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert_same(retrieval_metrics(sim.to(dtype), qp.int(), gp.to(torch.int16), max_rank=20), base)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_full_sort(seed):
    gen = torch.Generator().manual_seed(seed)
    num_q, num_g = [(37, 53), (101, 80), (64, 257), (9, 400), (150, 150)][seed]
    num_ids = [9, 30, 5, 60, 150][seed]
    qp = torch.randint(0, num_ids, (num_q,), generator=gen)
    gp = torch.randint(0, num_ids, (num_g,), generator=gen)
    sim = torch.randn(num_q, num_g, generator=gen) + 1.5 * (qp[:, None] == gp[None, :])
    if seed % 2:
        sim = (sim * 2).round() / 2  # many exact ties
    want = full_sort_metrics(sim, qp, gp)
    for chunk_size in (None, 1, 7, 1000):
        assert_same(retrieval_metrics(sim, qp, gp, chunk_size=chunk_size), want)
    assert_same(retrieval_metrics(sim.double(), qp, gp), want)


def test_all_counting_paths_agree(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    qp, gp = torch.randint(0, 4, (45,), generator=gen), torch.randint(0, 4, (301,), generator=gen)
    sim = ((torch.randn(45, 301, generator=gen) + 2.0 * (qp[:, None] == gp[None, :])) * 3).round()
    want = full_sort_metrics(sim, qp, gp)
    # Small temporaries and tasks: one row per step, many worker tasks; with one and two torch threads.
    monkeypatch.setattr(metrics_module, "_WORK_BYTES", {"cpu": 1, "other": 1})
    monkeypatch.setattr(metrics_module, "_TASK_COMPARISONS", 1)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert_same(retrieval_metrics(sim, qp, gp, chunk_size=10), want)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    # Binary-search counting, used for queries with many relevant items.
    monkeypatch.setattr(metrics_module, "_MAX_COMPARE_THRESHOLDS", 0)
    assert_same(retrieval_metrics(sim, qp, gp, chunk_size=16), want)


@pytest.mark.parametrize("args, name", [
    ((torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(1, dtype=torch.long)), "similarity"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
     "similarity"),
    ((torch.zeros(2, 3), torch.zeros(2), torch.zeros(3, dtype=torch.long)), "query_pids"),
    ((torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)), "query_pids"),
    ((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)), "gallery_pids"),
    ((torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), [1, 2, 3]), "gallery_pids"),
])
def test_bad_inputs_name_the_argument(args, name):
    with pytest.raises(UserError, match=name):
        retrieval_metrics(*args)


def test_other_errors():
    sim, qp, gp = torch.zeros(2, 3), torch.tensor([1, 2]), torch.tensor([1, 2, 3])
    with pytest.raises(UserError, match="max_rank"):
        retrieval_metrics(sim, qp, gp, max_rank=5)
    with pytest.raises(UserError, match="chunk_size"):
        retrieval_metrics(sim, qp, gp, chunk_size=0)
    with pytest.raises(UserError, match="no query identity"):
        retrieval_metrics(sim, torch.tensor([7, 8]), gp)
    sim[1, 2] = math.nan
    with pytest.raises(UserError, match="NaN score in row 1"):
        retrieval_metrics(sim, qp, gp)


def test_format_table():
    row = {"R1": 1.234, "R5": 5.0, "R10": 10.0, "mAP": 50.5, "mINP": 7.891, "num_queries": 3}
    table = format_table({"i2t": row, "t2i": dict(row, R1=99.999), "num_queries": 3})
    assert table.field_names == ["task", "R1", "R5", "R10", "mAP", "mINP"]
    assert [r[0] for r in table.rows] == ["t2i", "i2t"]
    assert table.rows[0][1] == "100.00" and table.rows[1][1:] == ["1.23", "5.00", "10.00", "50.50", "7.89"]
