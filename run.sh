#!/bin/sh
# One command for the common jobs. Paths (./data, ./logs) are relative to the current folder.
#   sh run.sh                      generate Demo-PEDES if missing, train PHP on it (configs/demo.yaml), test it
#   sh run.sh <preset> [--k v ...] train and test a preset of configs/ (php_cuhk, php_icfg, php_rstp, irra_cuhk, ...);
#                                  a run that has a last.pth is continued (a finished one only tested again)
#   sh run.sh <preset> --seeds 1 2 3 [--k v ...]
#                                  one run per seed, named <name>_seed<N>; `sh run.sh test` then adds mean +- std
#   sh run.sh methods [--seeds 1 2 3] [--paper cuhk|icfg|rstp] [--methods IRRA,PHP] [--tag T] [--k v ...]
#                                  train and test every method's Demo preset (IRRA, PHP, RDE, TBPS-CLIP; with --paper
#                                  their paper presets) under one protocol; writes logs/methods.md and .csv
#   sh run.sh test [--k v ...] [RUN_DIR ...]
#                                  evaluate run folders (default: every folder under ./logs with configs.yaml and
#                                  best.pth), this project's and published ones; writes logs/summary.md and .csv
#   sh run.sh serve [RUN_DIR ...] [--port 7860] [--host 127.0.0.1] [--gallery DIR]
#                                  a local search page and /api/search for run folders (default: every one under ./logs)
#   sh run.sh leak-study           the batch-leak experiment of docs/batch_leak.md
# Each job is a module of tools/ (python -m tools.<name>), run with the project on the import path.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

job=${1:-demo}
case "$job" in
    test)
        shift
        exec "$PYTHON" -m tools.evaluate_runs "$@" ;;
    serve)
        shift
        exec "$PYTHON" -m tools.serve "$@" ;;
    methods)
        shift
        exec "$PYTHON" -m tools.methods "$@" ;;
    leak-study)
        shift
        exec "$PYTHON" -m tools.leak_study "$@" ;;
    demo|--*)
        [ "$job" = demo ] && [ $# -gt 0 ] && shift
        if [ -d logs ] && [ -n "$(find logs -mindepth 2 -maxdepth 4 -name best.pth 2>/dev/null | head -n 1)" ]; then
            echo "note: ./logs already holds trained runs; 'sh run.sh test' evaluates them all."
        fi
        exec "$PYTHON" -m tools.run_preset --config_file "$HERE/configs/demo.yaml" "$@" ;;
    *)
        shift
        if [ ! -f "$HERE/configs/$job.yaml" ]; then
            echo "error: unknown job or preset '$job'; presets: $(cd "$HERE/configs" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
            exit 2
        fi
        exec "$PYTHON" -m tools.run_preset --config_file "$HERE/configs/$job.yaml" "$@" ;;
esac
