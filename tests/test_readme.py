"""README.md is a guide: at most 300 lines, no commit hashes (measurements and their commits live in docs/results.md
and benchmarks/README.md), one test command for CI, and every local link it gives leads to a file."""
import os
import re

from helpers import ROOT

README = os.path.join(ROOT, "README.md")


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_the_readme_is_a_short_guide_without_commit_hashes():
    text = readme()
    assert len(text.splitlines()) <= 300
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not hashes, hashes
    assert len(re.findall(r"python -m pytest", text)) == 1


def test_the_readmes_links_lead_to_files():
    targets = re.findall(r"\]\(([^)#]+)\)", readme())
    missing = [t for t in targets if not t.startswith("http") and not os.path.exists(os.path.join(ROOT, t))]
    assert targets and not missing, missing
