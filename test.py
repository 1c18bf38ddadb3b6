"""Evaluate a run folder: `python test.py --config_file RUN/configs.yaml [--checkpoint P] [--compat none]`.

Works on this project's runs and on published IRRA / PHP run folders. Prints the metrics table and writes
`test_results.json` beside the config, with the result's provenance (commit, file hashes, versions, date).
`--audit` checks whether embeddings depend on their batch (exit 3 if so). Every evaluation of the test split is
also appended to `test_log.jsonl` in the run folder. The job itself is evaluation.testing.test_run.
"""
from __future__ import annotations

from evaluation.testing import TestRequest, test_run
from utils.cli import add_shared, command, parse_command_line, run_main
from utils.logger import setup_logger

COMMAND = command("test.py", __doc__,
                  epilog="Config options can follow as --key value, e.g. --root_dir /data --test_batch_size 256.")
COMMAND.add_argument("--config_file", required=True, metavar="FILE", help="the run's configs.yaml")
COMMAND.add_argument("--checkpoint", help="checkpoint to evaluate (default: best.pth beside the config)")
COMMAND.add_argument("--split", choices=("test", "val"), default="test", help="split to evaluate")
COMMAND.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
COMMAND.add_argument("--audit", action="store_true", help="check that embeddings do not depend on the batch")
add_shared(COMMAND, "compat", "trust_checkpoint", "debug")


def main(argv) -> int:
    args = parse_command_line(COMMAND, argv)
    setup_logger()
    return test_run(TestRequest(args.config_file, args.checkpoint, args.split, args.i2t, args.audit, args.compat,
                                args.overrides, args.trust_checkpoint))


if __name__ == "__main__":
    run_main(main)
