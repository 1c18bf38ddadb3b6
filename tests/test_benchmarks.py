"""Smoke tests of the benchmark scripts (train_step, data_pipeline, step_ops) at toy sizes; no timing asserted."""
import json
import os

import pytest

from benchmarks import data_pipeline, step_ops, train_step

# Trains, compiles or starts processes: not in the quick subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY = ["--device", "cpu", "--arch", "ViT-Tiny", "--img_size", "32", "16", "--text_length", "16", "--batch_size", "4",
       "--steps", "1", "--warmup", "1", "--repeats", "1"]


def test_train_step_writes_every_mode(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert train_step.main(TOY + ["--modes", "fp32,bf16", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    for mode in ("fp32", "bf16"):
        assert set(results[mode]) >= {"samples_per_s", "peak_mem_gb"}
        assert results[mode]["samples_per_s"] > 0
        assert 0 < results[mode]["peak_mem_gb"] < 64
    assert results["_meta"]["flops_per_sample"] > 0
    assert results["bf16"]["precision"] == "bf16"
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "GFLOP" in printed


def test_train_step_compiles_the_backbone_blocks(tmp_path):
    """The 'compile' mode compiles each backbone block in place (regional compilation) and still trains."""
    args = train_step.parse_args(TOY + ["--modes", "compile", "--no_flops"])
    assert args.compile_scope == "blocks"
    record = train_step.run_worker(args, "compile", "bf16", count=False)
    assert record.get("compile_scope") == "blocks", record
    assert record["samples_per_s"] > 0 and record["precision"] == "bf16"


def test_train_step_failed_mode_is_reported_not_raised(tmp_path):
    args = train_step.parse_args(TOY + ["--modes", "half", "--mode_timeout", "0"])
    record = train_step.run_worker(args, "half", "bf16", count=False)
    assert record["mode"] == "half" and record["note"].startswith("unsupported")
    summary = train_step.summarise({"half": [record]}, flops=None)
    assert summary["half"]["samples_per_s"] is None and summary["half"]["peak_mem_gb"] is None


def test_train_step_rejects_unknown_mode():
    with pytest.raises(SystemExit) as err:
        train_step.parse_args(["--modes", "fp32,fp8"])
    assert err.value.code == 2


def test_flop_count_matches_matmul_arithmetic():
    import torch
    from torch import nn
    layer = nn.Linear(8, 4, bias=False)

    class Wrap(nn.Module):
        def forward(self, batch):
            return {"x_loss": layer(batch["images"]).sum()}

    flops = train_step.count_flops(Wrap(), {"images": torch.randn(3, 8)})
    # forward 2*8*4 per sample, backward only the weight gradient (the input needs none): the same again
    assert flops == 2 * (2 * 8 * 4)


def test_data_pipeline_against_a_step_json(demo_root, tmp_path, capsys):
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"fp32": {"samples_per_s": 2.0, "peak_mem_gb": 1.0},
                                "bf16": {"samples_per_s": 4.0, "peak_mem_gb": 1.0},
                                "_meta": {"batch_size": 8, "device_name": "toy"}}))
    out = tmp_path / "pipe.json"
    assert data_pipeline.main(["--workers", "0,1", "--batch_size", "8", "--batches", "2", "--root_dir", demo_root,
                               "--cache", "off,on", "--step_json", str(step), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["workers"]) == {"0", "1", "0+cache", "1+cache"}
    for r in results["workers"].values():
        assert r["images_per_s"] > 0 and r["startup_s"] >= 0 and r["preload_s"] >= 0
        assert r["vs_step"] == pytest.approx(r["images_per_s"] / 4.0)
    assert results["_meta"]["step_source"].startswith("bf16")
    slower = any(r["vs_step"] < 1 for r in results["workers"].values())
    assert ("data-bound" in capsys.readouterr().out) == slower


def test_data_pipeline_rejects_an_unknown_cache_setting(demo_root):
    with pytest.raises(SystemExit):
        data_pipeline.main(["--workers", "0", "--cache", "maybe", "--root_dir", demo_root])


def test_data_pipeline_names_a_missing_step_mode(demo_root, tmp_path):
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"fp32": {"samples_per_s": 2.0, "peak_mem_gb": 1.0}}))
    with pytest.raises(SystemExit) as err:
        data_pipeline.main(["--workers", "0", "--batch_size", "8", "--root_dir", demo_root,
                            "--step_json", str(step), "--step_mode", "compile"])
    assert "compile" in str(err.value) and "fp32" in str(err.value)


def test_step_ops_counts_each_phase_and_experts_run_batched(tmp_path, capsys):
    tiny = ["--arch", "ViT-Tiny", "--img_size", "32", "16", "--text_length", "16", "--batch_size", "2"]
    totals = {}
    for experts in (2, 6):
        out = tmp_path / f"ops{experts}.json"
        assert step_ops.main(tiny + ["--num_experts", str(experts), "--json", str(out)]) == 0
        totals[experts] = json.loads(out.read_text())["totals"]
    for phase in ("backward", "optimizer", "forward: php.efp", "forward: backbone.visual"):
        assert totals[2][phase] > 0
    # Views launch no kernel and are not counted: the tiny towers' forward stays well under 100 per block.
    assert totals[2]["forward: backbone.visual"] < 2 * 100
    # The experts run as batched products: more experts, the same number of operations (stacking 4 more
    # weights per tensor is still one stack), where a loop over experts would add a dozen per expert.
    assert totals[6]["forward: php.efp"] == totals[2]["forward: php.efp"]
    assert "total" in capsys.readouterr().out


def test_selection_pass_reports_its_share_of_an_epoch(capsys):
    """RDE's CCD pass against the training step, at toy size: a share strictly between 0 and 1."""
    from benchmarks import selection_pass
    argv = ["--device", "cpu", "--arch", "ViT-Tiny", "--img_size", "32", "16", "--text_length", "16",
            "--batch_size", "4", "--steps", "1", "--repeats", "1", "--pairs", "200", "--precision", "fp32",
            "--config", os.path.join(ROOT, "configs", "rde_demo.yaml")]
    assert selection_pass.main(argv) == 0
    printed = capsys.readouterr().out
    share = float(printed.split("selection share of an epoch of 200 pairs:")[1].split()[0])
    assert 0 < share < 1, printed
    assert "device cpu (" in printed and "train step" in printed


def test_step_profile_splits_a_step_into_matrix_products_and_the_rest(capsys):
    from benchmarks import step_profile
    args = step_profile.parse_args(["--arch", "ViT-Tiny", "--img_size", "32", "16", "--text_length", "16",
                                    "--batch_size", "4", "--steps", "1", "--warmup", "1", "--modes", "fp32"])
    result = step_profile.profile_step(args, "fp32")
    assert 0 < result["matmul_ms"] < result["step_ms"]
    assert any("mm" in name for name, _ in result["top"])
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--modes", "fp16"])
