#!/bin/sh
# One command for the common jobs. Paths (./data, ./logs) are relative to the current folder.
#   sh run.sh                      generate Demo-PEDES if missing, train PHP on it (configs/demo.yaml), test it
#   sh run.sh <preset> [--k v ...] train and test a preset of configs/ (php_cuhk, php_icfg, php_rstp, irra_cuhk, ...)
#   sh run.sh test [--k v ...] [RUN_DIR ...]
#                                  evaluate run folders (default: every folder under ./logs with configs.yaml and
#                                  best.pth), this project's and published ones; writes logs/summary.md and .csv
#   sh run.sh leak-study           the batch-leak experiment of docs/batch_leak.md
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

run_dir() {
    "$PYTHON" -c 'import sys; from utils.cli import split_argv; from train import parser; from utils.config import build_config
args, over = split_argv(parser(), sys.argv[1:]); print(build_config(args.config_file, over).run_dir)' "$@"
}

train_and_test() {
    config=$1; shift
    "$PYTHON" "$HERE/tools/preflight.py" --config_file "$config" "$@"
    dir=$(run_dir --config_file "$config" "$@")
    if [ -f "$dir/last.pth" ]; then
        # Never overwrite a run: continue it (a finished one is only tested again).
        echo "note: $dir already holds a run; continuing it (use another --name for a new one)"
        "$PYTHON" "$HERE/train.py" --config_file "$config" "$@" --resume
    else
        "$PYTHON" "$HERE/train.py" --config_file "$config" "$@"
    fi
    "$PYTHON" "$HERE/test.py" --config_file "$dir/configs.yaml"
}

job=${1:-demo}
case "$job" in
    test)
        shift
        exec "$PYTHON" "$HERE/tools/evaluate_runs.py" "$@" ;;
    leak-study)
        shift
        exec "$PYTHON" "$HERE/tools/leak_study.py" "$@" ;;
    demo|--*)
        [ "$job" = demo ] && [ $# -gt 0 ] && shift
        if [ -d logs ] && [ -n "$(find logs -mindepth 2 -maxdepth 4 -name best.pth 2>/dev/null | head -n 1)" ]; then
            echo "note: ./logs already holds trained runs; 'sh run.sh test' evaluates them all."
        fi
        train_and_test "$HERE/configs/demo.yaml" "$@" ;;
    *)
        shift
        if [ ! -f "$HERE/configs/$job.yaml" ]; then
            echo "error: unknown job or preset '$job'; presets: $(cd "$HERE/configs" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
            exit 2
        fi
        train_and_test "$HERE/configs/$job.yaml" "$@" ;;
esac
