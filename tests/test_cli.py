"""The one command-line parser (utils/cli.py, on argparse) and the small tools on it: preflight's messages, the
leak study's option forwarding, and the halved MLM weight of published PHP runs."""
import os
import textwrap

import pytest

from helpers import ROOT, SMOKE_CONFIG, assert_one_error_line, run_entry
from model.registry import LOSSES, loss_weight
from published_layout import write_published_run
import train
from utils.cli import command, integer, parse_command_line
from utils.errors import UserError

PLAIN = command("prog", "a command")
PLAIN.add_argument("--config_file")
PLAIN.add_argument("--seeds", nargs="+", type=integer)
PLAIN.add_argument("--audit", action="store_true")
PLAIN.add_argument("--query", dest="queries", action="append")
WITH_RUNS = command("prog", "a command", positionals="RUN_DIR")
WITH_RUNS.add_argument("--audit", action="store_true")


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
    (["--config_file", "a", "--config_file", "b"], "option '--config_file' is given twice"),
    (["--config_file"], "--config_file needs a value"),
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
    no_options = command("prog", "no options", options=False)
    no_options.add_argument("--decode", action="store_true")
    with pytest.raises(UserError, match="unknown option '--decod'; did you mean '--decode'"):
        parse_command_line(no_options, ["--decod"])
    with pytest.raises(UserError, match="unknown option '--lr'"):
        parse_command_line(no_options, ["--lr", "1"])


def test_an_abbreviation_is_no_option():
    """argparse would read `--config x` as `--config_file x`; here it is an unknown option."""
    with pytest.raises(UserError, match="unknown option '--config'; did you mean '--config_file'"):
        parse_command_line(PLAIN, ["--config", "x"])


def test_help_lists_the_flags_and_the_config_options(capsys):
    with pytest.raises(SystemExit) as done:
        parse_command_line(PLAIN, ["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--seeds SEEDS [SEEDS ...]" in out and "--lr (float" in out
    assert "config options:" in out


def test_help_of_train_py_lists_a_schema_option_with_its_type_default_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps the help to the terminal's width
    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: train.py [-h] [--config_file FILE]")
    lines = out.split("\nconfig options:\n", 1)[1].splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["--lr"])
    assert lines[at].split() == ["--lr", "(float,", "default", "3e-06)"]
    assert lines[at + 1].strip().startswith("Base learning rate."), lines[at:at + 2]
    assert "--config_file FILE" in out.split("config options:")[0]  # the command's own flag, not an option


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "x"], "error: command line: --seeds takes an integer; got 'x'"),
    (["--audit=yes"], "error: command line: --audit takes no value"),
    (["--seeds"], "error: command line: --seeds needs at least one value"),
])
def test_an_argparse_error_of_a_benchmark_parser_is_one_line(capsys, argv, message):
    """A parser read with argparse's own parse_args (the benchmarks') exits 2 with the project's one error line,
    not argparse's usage and `prog: error:` lines."""
    with pytest.raises(SystemExit) as done:
        PLAIN.parse_args(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.strip() == message, err


def test_argparse_errors_of_an_entry_point_are_one_error_line(tmp_path, capsys):
    from tools import run_preset
    out = tmp_path / "o"
    for argv, message in (
            (["--config_file", SMOKE_CONFIG, "--seeds", "1", "--seeds", "2", "--output_dir", str(out)],
             "command line: option '--seeds' is given twice; give it once"),
            (["--output_dir", str(out), "--config_file"], "command line: --config_file needs a value"),
            (["--seeds", "1", "--output_dir", str(out)],
             "command line: the following arguments are required: --config_file")):
        code, err = run_entry(run_preset.main, argv, capsys)
        assert_one_error_line(code, err, message)
        assert code == 2 and "usage:" not in err
    assert not out.exists()


PLUGIN = """
    from model import register_loss
    from utils.schema import Option

    @register_loss("plug_cli", weight=0.25, options=[Option("plug_cli_scale", float, 2.0, "A scale.", minimum=0)])
    def loss(out, cfg):
        return cfg.plug_cli_scale * out["image_feats"].pow(2).mean()
"""


def test_a_plugin_option_on_the_command_line_is_read_after_its_custom_imports(tmp_path):
    """`--plug_cli_scale` is unknown to the parser when parsing starts (the plug-in is imported when the config is
    built): argparse leaves it over, and it still reaches the config, as text, in any order. Once the plug-in is
    imported, the parser knows the option, with the same outcome."""
    from utils.config import build_config, option_names
    path = tmp_path / "plug_cli.py"
    path.write_text(textwrap.dedent(PLUGIN))
    assert "plug_cli_scale" not in option_names()
    with pytest.raises(UserError, match="option '--plug_cli_scale' is given twice"):
        parse_command_line(train.COMMAND, ["--custom_imports", str(path), "--plug_cli_scale", "3",
                                           "--plug_cli_scale", "4"])
    for argv in (["--config_file", SMOKE_CONFIG, "--custom_imports", str(path), "--plug_cli_scale", "3"],
                 ["--plug_cli_scale=3", "--config_file", SMOKE_CONFIG, "--custom_imports", str(path)]):
        args = parse_command_line(train.COMMAND, argv)
        assert args.overrides == {"custom_imports": str(path), "plug_cli_scale": "3"}
        cfg = build_config(args.config_file, args.overrides)
        assert cfg.plug_cli_scale == 3.0 and "plug_cli_scale" in cfg.plugin_options
    with pytest.raises(UserError, match="option 'plug_cli_scale' must be 0 or more"):
        build_config(SMOKE_CONFIG, parse_command_line(train.COMMAND, ["--custom_imports", str(path),
                                                                      "--plug_cli_scale", "-1"]).overrides)


def test_an_option_not_given_keeps_the_config_files_value():
    args = parse_command_line(train.COMMAND, ["--config_file", SMOKE_CONFIG, "--debug"])
    assert args.overrides == {} and args.debug and args.config_file == SMOKE_CONFIG


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
    assert loss_weight(LOSSES["mlm"], php.cfg, php.model.head_names) == expected
    irra = load_model(write_published_run(str(tmp_path / "irra"), "irra", dataset_name="Demo-PEDES",
                                          mlm_loss_weight=written or 1.0))
    assert loss_weight(LOSSES["mlm"], irra.cfg, irra.model.head_names) == (written or 1.0)
