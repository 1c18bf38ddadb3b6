#!/bin/sh
# The README's pictures, made from a trained demo run:
#   docs/images/retrieval.png (retrieve.py), docs/images/curves.png (tools/plot_curves.py),
#   docs/images/experts.png (test.py's expert usage), docs/images/search_page.png (the browser test of the page).
#
#   sh tools/make_readme_images.sh [RUN_DIR]      (default: logs/Demo-PEDES/php_demo, what `sh run.sh` trains)
#
# Also writes curves.png, experts.png, test_results.json and cache/ inside the run folder.
set -e
cd "$(dirname "$0")/.."
RUN=${1:-logs/Demo-PEDES/php_demo}
OUT=docs/images
if [ ! -f "$RUN/configs.yaml" ]; then
    echo "error: $RUN/configs.yaml not found (train the demo first: sh run.sh)" >&2
    exit 2
fi
mkdir -p "$OUT"

# Two test captions (their identity is known: green / red frames) and one free-text query (grey frames).
python retrieve.py --config_file "$RUN/configs.yaml" --split test --topk 6 \
    --caption 0 --caption 800 \
    --query "a woman with long black hair in a red dress and white shoes, carrying a black handbag" \
    --out "$OUT/retrieval.png"
# 256 colours keep the README picture small (about a third of the full-colour PNG).
python -c "import sys; from PIL import Image; p = sys.argv[1]; Image.open(p).quantize(256).save(p, optimize=True)" \
    "$OUT/retrieval.png"

python -m tools.plot_curves "$RUN"
cp "$RUN/curves.png" "$OUT/curves.png"

python test.py --config_file "$RUN/configs.yaml"
cp "$RUN/experts.png" "$OUT/experts.png"

ls -l "$OUT"/retrieval.png "$OUT"/curves.png "$OUT"/experts.png

# The search page, as the browser test draws it (headless Debian chromium through Playwright).
SEARCH_PAGE_SCREENSHOT="$PWD/$OUT/search_page.png" python -m pytest -q tests/test_serve.py -k browser
ls -l "$OUT"/search_page.png
