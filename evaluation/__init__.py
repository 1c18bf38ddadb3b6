"""Evaluation: embedding a split (embed.py), retrieval metrics (metrics.py), the Evaluator, the batch-independence
audit, the gallery cache and retrieval picture of retrieve.py, the expert-usage report, the summary table of
`sh run.sh test` (summary.py) and the log of every look at a run's test split (eval_log.py).

A package of its own, above model/ and datasets/ and beside the trainer, because five callers share it:
training's validation, test.py, retrieve.py, `sh run.sh test` (tools/evaluate_runs.py) and the tools and
benchmarks. None of them but training needs the trainer, the optimizer or the schedules, so importing this package
must not pull those in (tests/test_layering.py checks that it imports only utils, datasets and model).
"""
