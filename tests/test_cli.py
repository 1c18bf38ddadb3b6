"""The one command-line parser (utils/cli.py) and the small tools on it: preflight's messages, the leak study's
option forwarding, and the halved MLM weight of published PHP runs."""
import os

import pytest

from helpers import ROOT, SMOKE_CONFIG, assert_one_error_line, run_entry
from model.registry import LOSSES, loss_weight
from published_layout import write_published_run
from utils.cli import Command, Flag, integer, parse_command_line
from utils.errors import UserError

PLAIN = Command("prog", "a command", flags=(Flag("config_file"), Flag("seeds", nargs="+", type=integer),
                                           Flag("audit", nargs=0), Flag("query", dest="queries", repeat=True)))
WITH_RUNS = Command("prog", "a command", positionals="RUN_DIR", flags=(Flag("audit", nargs=0),))


def test_options_take_the_tokens_up_to_the_next_option():
    args = parse_command_line(PLAIN, ["--img_size", "64", "32", "--seeds", "1", "2", "--img_aug", "--lr=1e-4",
                                      "--audit", "--query", "a", "--query", "b c", "--config_file", "x.yaml"])
    assert args.overrides == {"img_size": ["64", "32"], "img_aug": "true", "lr": "1e-4"}
    assert args.seeds == [1, 2] and args.audit is True and args.queries == ["a", "b c"]
    assert args.config_file == "x.yaml" and args.positionals == []


def test_with_positionals_an_option_takes_one_token():
    args = parse_command_line(WITH_RUNS, ["A", "--root_dir", "X", "B", "--audit", "C"])
    assert args.positionals == ["A", "B", "C"] and args.overrides == {"root_dir": "X"} and args.audit


@pytest.mark.parametrize("argv, message", [
    (["--seed", "3", "--seed", "4"], "option '--seed' is given twice"),
    (["--config_file", "a", "--config_file", "b"], "--config_file given twice"),
    (["--seeds"], "--seeds needs at least one value"),
    (["--seeds", "1", "x"], "--seeds takes an integer; got 'x'"),
    (["--seeds", "1_0"], "--seeds takes an integer; got '1_0'"),
    (["--audit=yes"], "--audit takes no value"),
    (["stray"], "expected an option starting with '--', got 'stray'"),
    (["--config_fil", "x"], "unknown option '--config_fil'; did you mean '--config_file'?"),
])
def test_bad_command_lines_are_one_line(argv, message):
    with pytest.raises(UserError, match="^command line: .*" + message.replace("?", r"\?").replace("(", r"\(")):
        parse_command_line(PLAIN, argv)


def test_a_command_without_config_options_refuses_them():
    command = Command("prog", "no options", flags=(Flag("decode", nargs=0),), overrides=False)
    with pytest.raises(UserError, match="unknown option '--decod'; did you mean '--decode'"):
        parse_command_line(command, ["--decod"])


def test_help_lists_the_flags_and_the_config_options(capsys):
    with pytest.raises(SystemExit) as done:
        parse_command_line(PLAIN, ["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--seeds SEEDS ..." in out and "--lr (float" in out


def test_preflight_names_every_missing_piece(tmp_path, capsys, monkeypatch):
    """`python -m tools.preflight` and `sh run.sh php_cuhk`: the data set and the CLIP weights, each named with the
    place it was looked for."""
    from tools import preflight, run_preset
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip of this machine's
    argv = ["--config_file", os.path.join(ROOT, "configs", "php_cuhk.yaml"), "--root_dir", str(tmp_path / "data"),
            "--pretrained_dir", str(tmp_path / "weights"), "--output_dir", str(tmp_path / "logs")]
    code, err = run_entry(preflight.main, argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0].startswith(f"missing: data root {tmp_path / 'data'} does not exist")
    assert f"{tmp_path / 'data' / 'CUHK-PEDES' / 'reid_raw.json'}" in lines[0]
    assert lines[1].startswith("missing: pretrained CLIP weights for 'ViT-B/16' not found; looked in "
                               f"{tmp_path / 'weights' / 'ViT-B-16.pt'} and {tmp_path / '.cache' / 'clip'}")
    code, err = run_entry(run_preset.main, argv, capsys)
    line = assert_one_error_line(code, err, "missing: data root", "; missing: pretrained CLIP weights")
    assert line.count("missing:") == 2 and not (tmp_path / "logs").exists()


def test_leak_study_forwards_list_options_as_parsed(tiny_root, tmp_path):
    from tools import leak_study
    args = parse_command_line(leak_study.COMMAND, ["--config_file", SMOKE_CONFIG, "--img_size", "64", "32",
                                                   "--root_dir", tiny_root, "--output_dir", str(tmp_path)])
    configs = leak_study.study_configs(args.config_file, args.overrides)
    assert sorted(configs) == ["batch", "tokens"]
    for mode, cfg in configs.items():
        assert cfg.img_size == [64, 32] and cfg.efp_attention == mode and cfg.name == f"leak_{mode}"
        assert cfg.root_dir == tiny_root and not cfg.resume


@pytest.mark.slow
def test_leak_study_runs_with_list_options(tiny_root, tmp_path, capsys):
    """The whole study on the tiny set with `--img_size 64 32` (which an argv round trip once broke)."""
    from tools import leak_study
    out = tmp_path / "leak.md"
    code, err = run_entry(leak_study.main, ["--config_file", SMOKE_CONFIG, "--img_size", "64", "32", "--root_dir",
                                            tiny_root, "--output_dir", str(tmp_path / "logs"), "--num_epoch", "1",
                                            "--warmup_epochs", "0", "--batch_size", "8", "--out", str(out),
                                            "--eval_batch_size", "4"], capsys)
    assert code == 0, err
    text = out.read_text()
    assert text.count("| efp_attention: tokens |") == 6 and text.count("| efp_attention: batch |") == 6
    assert "--img_size 64 32" in text


@pytest.mark.parametrize("written, expected", [(1.0, 0.5), (2.0, 1.0), (None, 0.5)])
def test_published_php_runs_halve_the_mlm_weight(tmp_path, written, expected):
    """The PHP reference multiplies its MLM loss by 0.5 (SPEC 7, 11): a published PHP config's mlm_loss_weight
    means half of it here; empty, the PHP default 0.5 applies. IRRA runs keep theirs."""
    from model import load_model
    php = load_model(write_published_run(str(tmp_path / "php"), "php_v1", dataset_name="Demo-PEDES",
                                         mlm_loss_weight=written), compat="none")
    assert loss_weight(LOSSES["mlm"], php.cfg) == expected
    irra = load_model(write_published_run(str(tmp_path / "irra"), "irra", dataset_name="Demo-PEDES",
                                          mlm_loss_weight=written or 1.0))
    assert loss_weight(LOSSES["mlm"], irra.cfg) == (written or 1.0)
