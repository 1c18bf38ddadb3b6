"""`precision: auto` (issue 28): on the CPU the faster of fp32 and bf16, timed on the run's own model and cached per
CPU, model and threads; explicit precisions are never timed; a run records its choice, and a resumed run keeps it.
Every test points the cache at a temporary file (PHP_PRECISION_CACHE), never at ~/.cache."""
import contextlib
import json
import os

import pytest
import torch
import yaml

import train
from benchmarks import train_step
from evaluation.embed import check_precision
from helpers import run_entry, run_dir, tiny_cfg, train_argv
from model import build_model
from processor import precision
from processor.precision import choose_precision, resolve_precision
from utils.checkpoint import read_checkpoint
from utils.env import autocast
from utils.schema import resume_differences

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(precision.CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def tiny():
    """A tiny config and its model (random weights, seeded)."""
    cfg = tiny_cfg(batch_size=8)
    torch.manual_seed(0)
    return cfg, build_model(cfg, 8)


@pytest.fixture
def timed(monkeypatch):
    """precision.measure replaced by fixed figures (bf16 twice as fast); returns the list of its calls."""
    calls = []

    def fake(cfg, model, device, batch_size, budget_s=precision.BUDGET_S):
        calls.append(batch_size)
        return {"fp32": 0.2, "bf16": 0.1}
    monkeypatch.setattr(precision, "measure", fake)
    return calls


def no_timing(*args, **kwargs):
    raise AssertionError("timed although it should not have")


def test_the_choice_is_the_faster_mode_and_a_cache_hit_times_nothing(tiny, cache, monkeypatch):
    cfg, model = tiny
    first = choose_precision(cfg, model, CPU, batch_size=8)
    assert set(first.timings) == {"fp32", "bf16"} and all(t > 0 for t in first.timings.values())
    assert not first.cached and first.source == "timed"
    fp32, bf16 = first.timings["fp32"], first.timings["bf16"]
    # bf16 only when faster by the margin; fp32 otherwise (a tie is not worth the rounding).
    assert first.precision == ("bf16" if bf16 < (1 - precision.MARGIN) * fp32 else "fp32")
    assert json.loads(cache.read_text())["entries"]
    monkeypatch.setattr(precision, "measure", no_timing)
    again = choose_precision(cfg, model, CPU, batch_size=8)
    assert again.cached and again.source == "cache" and again.seconds < 1.0
    assert (again.precision, again.timings) == (first.precision, first.timings)


def test_calibration_leaves_the_model_its_gradients_and_the_rng_as_they_were(tiny):
    cfg, model = tiny
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)
    rng = torch.get_rng_state()
    precision.measure(cfg, model, CPU, 8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert not any(m.training for m in model.modules())
    first.grad = None


def test_a_cache_written_on_another_cpu_is_not_used(tiny, timed, monkeypatch):
    cfg, model = tiny
    assert choose_precision(cfg, model, CPU, 8).precision == "bf16" and len(timed) == 1
    assert choose_precision(cfg, model, CPU, 8).cached and len(timed) == 1
    other = {"model": "Another CPU 9000", "flags": {f: False for f in precision.CPU_FLAGS}}
    monkeypatch.setattr(precision, "cpu_description", lambda: other)
    assert not choose_precision(cfg, model, CPU, 8).cached and len(timed) == 2
    # ... nor one of other shapes, or another thread count.
    assert not choose_precision(cfg, model, CPU, 4).cached and len(timed) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert not choose_precision(cfg, model, CPU, 4).cached and len(timed) == 4


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": []}', "[]", "\xff\xfe"])
def test_a_corrupt_cache_is_ignored_and_rewritten(tiny, timed, cache, php_log, content):
    cfg, model = tiny
    cache.parent.mkdir(parents=True)
    cache.write_bytes(content.encode("latin-1"))
    choice = choose_precision(cfg, model, CPU, 8)
    assert choice.precision == "bf16" and not choice.cached and len(timed) == 1
    assert any("ignoring the precision cache" in m for m in php_log)
    if content.startswith('{"version"'):  # recognisably this project's cache: rewritten, valid
        assert choose_precision(cfg, model, CPU, 8).cached
    else:  # not recognisably the cache: left as it is (tests/test_trust_config.py)
        assert cache.read_bytes() == content.encode("latin-1")


def test_an_explicit_precision_is_never_timed(tiny, monkeypatch):
    cfg, model = tiny
    monkeypatch.setattr(precision, "measure", no_timing)
    for explicit in ("fp32", "bf16", "fp16"):
        resolved, choice = resolve_precision(cfg.copy(precision=explicit), model, CPU, 8)
        assert resolved.precision == explicit and choice is None


@pytest.mark.parametrize("native_bf16,expected", [(True, "bf16"), (False, "fp16")])
def test_on_cuda_nothing_is_timed(tiny, monkeypatch, native_bf16, expected):
    """(No GPU here: the CUDA queries are stood in for; the GradScaler the trainer enables for fp16 is its own.)"""
    cfg, model = tiny
    monkeypatch.setattr(precision, "measure", no_timing)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    choice = choose_precision(cfg, model, torch.device("cuda:0"), 8)
    assert (choice.precision, choice.source, choice.timings) == (expected, "cuda", {})


def test_a_forward_the_synthetic_batch_cannot_feed_falls_back_to_fp32(tiny, cache, php_log):
    cfg, _ = tiny

    class NeedsMore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return {"x_loss": self.w * batch["something_else"].sum()}
    choice = choose_precision(cfg, NeedsMore(), CPU, 8)
    assert (choice.precision, choice.source) == ("fp32", "fallback") and "KeyError" in choice.note
    assert not cache.exists()  # a failure is not remembered
    assert any("precision auto: fp32" in m for m in php_log)


def test_auto_matches_any_recorded_choice_at_resume_and_evaluates_in_fp32(tiny):
    cfg, _ = tiny
    assert resume_differences(cfg.copy(precision="auto"), cfg.copy(precision="bf16")) == []
    refused = resume_differences(cfg.copy(precision="fp32"), cfg.copy(precision="bf16"))
    assert refused == ["precision ('bf16' -> 'fp32')"]
    assert check_precision("auto") == "fp32"
    assert isinstance(autocast(CPU, "auto"), contextlib.nullcontext)


def test_the_benchmark_names_the_cpu_and_its_flags():
    described = train_step.device_name("cpu", 1)
    for flag in precision.CPU_FLAGS:
        assert flag in described
    assert precision.cpu_description()["model"] in described


# ----------------------------------------------------------------------------------------- a run with auto
@pytest.fixture
def auto_run(tiny_root, tmp_path):
    out = str(tmp_path / "logs")
    assert train.main(train_argv(tiny_root, out, "--precision", "auto")) == 0
    return tiny_root, out, run_dir(out)


def recorded(folder):
    with open(os.path.join(folder, "configs.yaml")) as f:
        config = yaml.safe_load(f)
    with open(os.path.join(folder, "history.json")) as f:
        history = json.load(f)
    return config["precision"], [epoch["precision_choice"] for epoch in history]


@pytest.mark.slow
def test_a_run_records_its_choice_and_a_resume_keeps_it_whatever_the_cache_says(auto_run, cache, monkeypatch,
                                                                                  capsys):
    root, out, folder = auto_run
    chosen, choices = recorded(folder)
    assert chosen in ("fp32", "bf16") and len(choices) == 2
    assert choices[0]["requested"] == "auto" and choices[0]["chosen"] == chosen
    assert set(choices[0]["timings"]) == {"fp32", "bf16"} and choices[0]["source"] == "timed"
    assert read_checkpoint(os.path.join(folder, "last.pth"))["config"]["precision"] == chosen
    # The cache now says the other mode; a resume asking for auto keeps the run's own, and times nothing.
    other = {"fp32": "bf16", "bf16": "fp32"}[chosen]
    data = json.loads(cache.read_text())
    for entry in data["entries"].values():
        entry["precision"] = other
    cache.write_text(json.dumps(data))
    monkeypatch.setattr(precision, "measure", no_timing)
    code, err = run_entry(train.main, train_argv(root, out, "--precision", "auto", "--resume", "--num_epoch", "3"),
                          capsys)
    assert code == 0, err
    again, choices = recorded(folder)
    assert again == chosen and len(choices) == 3
    assert choices[2]["chosen"] == chosen and choices[2]["source"] == "recorded"
    assert choices[2]["timings"] == choices[0]["timings"]
    assert read_checkpoint(os.path.join(folder, "last.pth"))["config"]["precision"] == chosen
    # An explicit precision other than the recorded one is refused, as any changed option is.
    code, err = run_entry(train.main, train_argv(root, out, "--precision", other, "--resume", "--num_epoch", "4"),
                          capsys)
    assert code != 0 and f"precision ('{chosen}' -> '{other}')" in err


@pytest.mark.parametrize("methods", [
    {"php_modules": "none", "loss_names": "sdm+id+mlm"},  # IRRA: MLM inputs
    {"php_modules": "none", "loss_names": "nitc+ritc+citc+ss"},  # TBPS-CLIP: the extra image views
    {"php_modules": "none", "loss_names": "tal"},  # RDE: per-sample weights by index
])
def test_every_methods_model_is_timed_not_sent_to_the_fallback(methods, cache):
    # A batch that lacked what a loss reads (mlm_ids, view_mvs) sent IRRA and TBPS-CLIP to fp32 untimed.
    cfg = tiny_cfg(batch_size=8, **methods)
    torch.manual_seed(0)
    choice = choose_precision(cfg, build_model(cfg, 8), CPU, 8, budget_s=0.5)
    assert choice.source == "timed", choice.note
    assert set(choice.timings) == {"fp32", "bf16"}
