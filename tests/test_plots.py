"""Training curves (evaluation/curves.py through tools/plot_curves.py, and training drawing them) and the expert-usage report of test.py."""
import json
import os

from PIL import Image
import pytest
import torch

from methods.php.report import plot_usage, report_expert_usage, usage_report, usage_table
from evaluation import curves
from processor import training
from tools import plot_curves
from utils.cli import run_main
from utils.errors import UserError


def png_size(path):
    with Image.open(path) as img:
        return img.size


def expected_curves_size():
    return round(curves.FIGSIZE[0] * curves.DPI), round(curves.FIGSIZE[1] * curves.DPI)


def test_training_draws_its_curves(smoke_run):
    # The smoke run was trained by train.py, which draws curves.png at the end.
    path = os.path.join(smoke_run, "curves.png")
    assert os.path.isfile(path) and png_size(path) == expected_curves_size()


def test_curves_have_one_line_per_loss_and_metric(smoke_run):
    history = curves.read_history(smoke_run)
    fig = curves.curves_figure(history)
    try:
        ax_loss, ax_val = fig.axes
        terms = sorted(k[:-5] for k in history[0]["losses"] if k.endswith("_loss"))
        assert sorted(line.get_label() for line in ax_loss.get_lines()) == sorted(terms + ["total"])
        assert {"sdm", "itc", "aux"} <= set(terms)
        val_lines = {line.get_label(): list(line.get_xdata()) for line in ax_val.get_lines()}
        assert val_lines == {"R1": [1, 2], "mAP": [1, 2]}  # the smoke run evaluates after each epoch
        total = next(line for line in ax_loss.get_lines() if line.get_label() == "total")
        assert list(total.get_ydata()) == [h["losses"]["loss"] for h in history]
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_curves_without_evaluations_and_cli(tmp_path, capsys):
    history = [{"epoch": e, "lr": 1e-4, "seconds": 1.0, "losses": {"sdm_loss": 2.0 / e, "loss": 2.0 / e}}
               for e in (1, 2, 3)]
    (tmp_path / "history.json").write_text(json.dumps(history))
    with pytest.raises(SystemExit) as done:
        run_main(plot_curves.main, [str(tmp_path)])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert png_size(tmp_path / "curves.png") == expected_curves_size()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("{not json", "cannot be read"),
                                              ("[]", "non-empty list"), ('[{"epoch": 1}]', "non-empty list")])
def test_curves_bad_history(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "history.json").write_text(content)
    with pytest.raises(UserError, match=message):
        curves.plot_curves(str(tmp_path))
    with pytest.raises(SystemExit) as done:
        run_main(plot_curves.main, [str(tmp_path)])
    assert done.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_curve_failure_never_fails_training(tmp_path, monkeypatch, php_log):
    def broken(run_dir):
        raise RuntimeError("matplotlib is broken")

    monkeypatch.setattr(training, "plot_curves", broken)
    training.write_curves(str(tmp_path))
    assert any("matplotlib is broken" in line for line in php_log)
    monkeypatch.undo()
    training.write_curves(str(tmp_path))  # no history.json: a warning too
    assert any("history.json" in line for line in php_log)


def synthetic_usage(blocks=3, experts=4):
    counts = torch.arange(1, blocks * experts + 1).reshape(blocks, experts)
    return {"image": counts, "text": counts.flip(1)}


def test_expert_report_table_and_picture(tmp_path, php_log):
    usage = synthetic_usage()
    report = report_expert_usage(usage, str(tmp_path))
    assert set(report) == {"image", "text"} and len(report["image"]) == 3
    row = report["image"][0]
    assert row["tokens"] == [1, 2, 3, 4] and abs(sum(row["share"]) - 1) < 1e-6
    assert row["entropy"] < row["max_entropy"] == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert len(usage_table(report).rows) == 6  # 2 modalities x 3 blocks
    assert any("entropy" in m and "block" in m for m in php_log)
    # one bar chart per block: 3.2 x 3.0 inches per panel at 110 dpi
    assert png_size(tmp_path / "experts.png") == (3 * 352, 330)
    assert png_size(plot_usage(usage_report({"image": usage["image"][:1]}), str(tmp_path / "one.png"))) == \
        (352, 330)


def test_expert_picture_failure_keeps_the_report(tmp_path, php_log):
    missing = str(tmp_path / "no" / "such" / "folder")
    report = report_expert_usage(synthetic_usage(2), missing)
    assert len(report["text"]) == 2 and any("could not write" in m for m in php_log)


def test_test_py_prints_expert_usage(smoke_run, demo_root, tmp_path, capsys):
    import test as test_entry
    with pytest.raises(SystemExit) as done:
        run_main(test_entry.main, ["--config_file", os.path.join(smoke_run, "configs.yaml"), "--root_dir",
                                   demo_root])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "expert usage of the PHP head" in out and "image" in out and "text" in out
    assert png_size(os.path.join(smoke_run, "experts.png")) == (352, 330)  # the smoke run has one EFP block
