"""Plain helpers of the tests (the fixtures are in conftest.py): the tiny Demo-PEDES and the smoke config's command
line for it, running an entry point in-process the way its `__main__` would, tiny models and batches, reading
retrieve.py's output, copies of runs, and the requirement files.

Training on the tiny set (8 / 4 / 2 identities, 2 images each, batch 8: 4 iterations per epoch) costs seconds.
"""
import ast
import hashlib
import functools
import os
import tempfile
import re
from typing import Dict, Optional, Set, Tuple

from PIL import Image
import pytest
import torch
import yaml

from utils.cli import run_main
from utils.config import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = SMOKE_CONFIG = os.path.join(ROOT, "configs", "smoke.yaml")
TINY = {"num_train_ids": 8, "num_val_ids": 4, "num_test_ids": 2, "images_per_id": 2}
FAST = ["--batch_size", "8"]  # 8 ids x 2 images x 2 captions = 32 pairs: 4 iterations per epoch
ITERS = 4


def train_argv(root, out, *extra, config=SMOKE):
    """train.py arguments: the smoke config on data root `root`, runs under `out`, batch 8 (unless `extra` sets
    it: an option may be given once), then `extra`."""
    fast = [] if "--batch_size" in extra else FAST
    return ["--config_file", config, "--root_dir", root, "--output_dir", out, *fast, *extra]


# configs/smoke.yaml's options of the PHP head and its loss: a run of another method on the smoke config leaves them
# out (an option of a component a run does not use may not be set).
PHP_SMOKE_KEYS = ("loss_names", "itc_loss_weight", "aux_factor", "php_modules", "cnum", "num_experts", "topk",
                  "reduction", "moe_layers", "moe_heads")


@functools.lru_cache(maxsize=1)
def plain_smoke() -> str:
    """configs/smoke.yaml without the PHP head's options: the config of the tests that train another method."""
    import yaml
    with open(SMOKE) as f:
        values = {k: v for k, v in yaml.safe_load(f).items() if k not in PHP_SMOKE_KEYS}
    path = os.path.join(tempfile.mkdtemp(prefix="smoke-"), "smoke.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    return path


def same_final_weights(*outs):
    """The last.pth of the smoke run under each output folder `outs`, asserted to hold identical weights."""
    from utils.checkpoint import read_checkpoint
    ckpts = [read_checkpoint(os.path.join(run_dir(out), "last.pth")) for out in outs]
    for key in ckpts[0]["model"]:
        assert all(torch.equal(ckpts[0]["model"][key], c["model"][key]) for c in ckpts[1:]), key
    return ckpts


def run_dir(out):
    """The run folder of the smoke config under output folder `out`."""
    return os.path.join(out, "Demo-PEDES", "smoke")


def run_entry(main, argv, capsys):
    """Run an entry point in-process as its `__main__` would; returns (exit code, stderr)."""
    code, _, err = run_entry_output(main, argv, capsys)
    return code, err


def run_entry_output(main, argv, capsys):
    """Run an entry point in-process as its `__main__` would; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    # Not pytest.raises: its ExceptionInfo would keep the failed run's frames (and data-loader workers) alive in a
    # reference cycle, which the garbage collector breaks only later and slowly (see run_main).
    try:
        run_main(main, argv)
    except SystemExit as e:
        code = e.code
    else:
        pytest.fail("run_main returned instead of exiting")
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *culprits):
    """A non-zero exit, stderr one line `error: ...` naming each of `culprits`, no traceback; returns the line."""
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err
    for name in culprits:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def tree(folder):
    """{relative path: sha256} of every file under `folder`: what a failed command must leave unchanged."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


# ---------------------------------------------------------------------------------- tiny models and batches
# The PHP head on the tiny backbone: the model most tests exercise (its head has every kind of output).
TINY_MODEL = {"pretrain_choice": "ViT-Tiny", "img_size": [32, 16], "text_length": 16, "loss_names": "sdm+itc+aux",
              "php_modules": "crfm+efp", "moe_layers": 2, "cnum": 3}


def tiny_cfg(**kw):
    return build_config(None, {**TINY_MODEL, **kw})


def captions(n, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        words = int(torch.randint(2, length - 2, (1,), generator=g))
        ids[i, 0] = 49406
        ids[i, 1:1 + words] = torch.randint(1, 49405, (words,), generator=g)
        ids[i, 1 + words] = 49407
    return ids


def batch(n=4, seed=0, mlm=False):
    g = torch.Generator().manual_seed(seed)
    out = {"images": torch.randn(n, 3, 32, 16, generator=g), "caption_ids": captions(n, seed=seed),
           "pids": torch.arange(n) // 2}
    if mlm:
        out["mlm_ids"] = out["caption_ids"].clone()
        out["mlm_labels"] = torch.zeros_like(out["caption_ids"])
        out["mlm_labels"][:, 1] = out["caption_ids"][:, 1]
        out["mlm_ids"][:, 1] = 49405
    return out


# ---------------------------------------------------------------------------------------- retrieve.py output
HIT = re.compile(r"^(\d+) (-?\d+\.\d{4}) (\S.*)$")


def retrieve_cli(capsys, run_dir, *args):
    """Run retrieve.py in-process; returns (exit code, output) with output = (stdout lines, stderr)."""
    import retrieve
    with pytest.raises(SystemExit) as done:
        run_main(retrieve.main, ["--config_file", os.path.join(run_dir, "configs.yaml"), *args])
    out, err = capsys.readouterr()
    return done.value.code, (out.splitlines(), err), err


def parse_output(output):
    """[(query header, [(rank, score, path), ...]), ...]: every stdout line is a hit, ranks restart at 1 for
    each query; the query headers and the final timing line are on stderr."""
    lines, err = output
    headers = [line for line in err.splitlines() if line.startswith("# query ")]
    queries = []
    for line in lines:
        match = HIT.match(line)
        assert match, f"unexpected output line {line!r}"
        if int(match.group(1)) == 1:
            queries.append((headers[len(queries)], []))
        queries[-1][1].append((int(match.group(1)), float(match.group(2)), match.group(3)))
    assert len(queries) == len(headers)
    assert re.search(r"^# answered in \d+\.\d{3} s ", err, re.M), err
    return queries


def pixel(path, xy):
    with Image.open(path) as img:
        return img.convert("RGB").getpixel(xy)


def small_images(folder, count):
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.new("RGB", (16, 32), (0, 0, 255)).save(paths[-1])
    return paths


# --------------------------------------------------------------------------------------- copies of runs, tools
def run_variant(run_dir, folder, noise=0.0, **options):
    """A copy of the run at `run_dir` in `folder`, with config `options` changed and `noise` added to its weights."""
    os.makedirs(folder)
    with open(os.path.join(run_dir, "configs.yaml")) as f:
        config = {**yaml.safe_load(f), **options}
    with open(os.path.join(folder, "configs.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    checkpoint = torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for value in checkpoint["model"].values():
        if value.is_floating_point():
            value += noise * torch.randn(value.shape, generator=generator)
    if "weights_crc32" in checkpoint:  # a changed model, not a damaged file: its checksums follow
        from utils.checkpoint import weight_checksums
        checkpoint["weights_crc32"] = weight_checksums(checkpoint["model"])
    torch.save(checkpoint, os.path.join(folder, "best.pth"))
    return folder


def run_tool(argv, cwd, monkeypatch):
    """Run the entry point in-process from `cwd`; returns its exit status."""
    from tools import evaluate_runs
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as done:
        run_main(evaluate_runs.main, list(argv))
    return done.value.code


def build_dataset(name, root_dir, check_images=True, generate=False, **options):
    """The data set `name` under `root_dir` with config `options` (val_holdout_ids, demo_seed, ...), as a run of
    those options builds it (datasets.dataset_from_config; `generate` as training does)."""
    from datasets import dataset_from_config
    from utils.config import Config
    return dataset_from_config(Config(dataset_name=name, root_dir=root_dir, **options), check_images=check_images,
                               generate=generate)


# ------------------------------------------------------------------------------------------ requirements
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")

# Run outputs and downloaded data (ignored by git); a .py file there is not the project's code.
NOT_CODE = {"data", "logs", "pretrained", "benchmark_out"}

# Import name -> distribution name, where the two differ.
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch", "sklearn": "scikit-learn"}
# Modules of one distribution that import another one it does not depend on.
NEEDS_MORE = {"torch.utils.tensorboard": "tensorboard"}


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_specs() -> Dict[str, str]:
    """requirements.txt as {normalised distribution name: version specifier}."""
    specs = {}
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, spec = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", line).groups()
                specs[normalise(name)] = spec
    return specs


def project_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (folder == ROOT and d in NOT_CODE)]
        yield from (os.path.join(folder, name) for name in files if name.endswith(".py"))


def absolute_imports(path: str) -> Set[Tuple[str, Optional[str]]]:
    """What `path` imports, anywhere in it: (module, name) for `from module import name`, (module, None) for
    `import module`; relative imports are the project's own and left out."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.update((node.module, alias.name) for alias in node.names)
    return found


