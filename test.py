"""Evaluate a run folder: `python test.py --config_file RUN/configs.yaml [--checkpoint P] [--compat none]`.

Works on this project's runs and on published IRRA / PHP run folders. Prints the metrics table and writes
`test_results.json` beside the config, with the result's provenance (commit, file hashes, versions, date).
`--audit` checks whether embeddings depend on their batch (exit 3 if so). Every evaluation of the test split is
also appended to `test_log.jsonl` in the run folder. The job itself is evaluation.testing.test_run.
"""
from __future__ import annotations

from evaluation.testing import TestRequest, test_run
from utils.cli import COMPAT, DEBUG, TRUST, Command, Flag, parse_command_line, run_main
from utils.logger import setup_logger

COMMAND = Command("test.py", __doc__, flags=(
    Flag("config_file", "the run's configs.yaml", required=True, metavar="FILE"),
    Flag("checkpoint", "checkpoint to evaluate (default: best.pth beside the config)"),
    Flag("split", "split to evaluate", choices=("test", "val"), default="test"),
    Flag("i2t", "also report image-to-text retrieval", nargs=0),
    Flag("audit", "check that embeddings do not depend on the batch", nargs=0),
    COMPAT, TRUST, DEBUG),
    epilog="Config options can follow as --key value, e.g. --root_dir /data --test_batch_size 256.")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    setup_logger()
    return test_run(TestRequest(args.config_file, args.checkpoint, args.split, args.i2t, args.audit, args.compat,
                                args.overrides, args.trust_checkpoint))


if __name__ == "__main__":
    run_main(main)
