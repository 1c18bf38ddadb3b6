"""Evaluation: embedding a split (embed.py), retrieval metrics (metrics.py), the Evaluator, the batch-independence
audit, the gallery cache and retrieval picture of retrieve.py, and the expert-usage report.

A package of its own, above model/ and datasets/ and beside the trainer, because five callers share it:
training's validation, test.py, retrieve.py, `sh run.sh test` (tools/evaluate_runs.py) and the tools and
benchmarks. None of them but training needs the trainer, the optimizer or the schedules, so importing this package
must not pull those in (tests/test_layering.py checks that it imports only utils, datasets and model).
"""
