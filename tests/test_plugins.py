"""Plug-ins (custom_imports): what a user's file may declare, and every way it can go wrong, in one line each."""
import json
import os
import re
import textwrap

import pytest
import torch

from datasets import dataset_from_config
from helpers import SMOKE_CONFIG, assert_one_error_line, run_entry
from model import HEADS, LOSSES, build_model
from solver import build_param_groups
import train
from utils.config import build_config, save_config
from utils.errors import UserError


def plugin(folder, name, body):
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return str(path)


LOSS = """
    from model import register_loss
    from utils.schema import Option

    @register_loss("{name}", weight=0.25, options=[Option("{name}_scale", float, 2.0, "A scale.", minimum=0)])
    def loss(out, cfg):
        return cfg.{name}_scale * out["image_feats"].pow(2).mean()
"""


def test_a_plugin_loss_and_its_options_join_the_schema(tmp_path):
    path = plugin(tmp_path, "plug_a.py", LOSS.format(name="plug_a"))
    cfg = build_config(SMOKE_CONFIG, {"custom_imports": path, "loss_names": "sdm+plug_a", "plug_a_scale": "3"})
    assert cfg.plug_a_scale == 3.0 and cfg.plug_a_loss_weight == 0.25 and LOSSES["plug_a"].owner == path
    model = build_model(cfg)
    batch = {"images": torch.randn(2, 3, 64, 32), "caption_ids": torch.tensor([[49406, 5, 49407] + [0] * 45] * 2),
             "pids": torch.tensor([0, 1])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["plug_a_loss"].dtype == torch.float32
    # The config round-trips through configs.yaml, its plug-in options included.
    save_config(cfg, str(tmp_path / "run" / "configs.yaml"))
    again = build_config(str(tmp_path / "run" / "configs.yaml"))
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(UserError, match=r"option 'plug_a_scale' must be 0 or more; got -1.0"):
        build_config(SMOKE_CONFIG, {"custom_imports": path, "plug_a_scale": "-1"})


def test_a_plugin_option_needs_its_plugin_listed(tmp_path):
    path = plugin(tmp_path, "plug_b.py", LOSS.format(name="plug_b"))
    build_config(SMOKE_CONFIG, {"custom_imports": path})
    with pytest.raises(UserError, match="unknown option '--plug_b_scale'; it belongs to the plug-in .*plug_b.py, "
                                        "which custom_imports does not list"):
        build_config(SMOKE_CONFIG, {"plug_b_scale": "1"})
    with pytest.raises(UserError, match=r"config: unknown loss 'plug_c'.*custom_imports"):
        build_model(build_config(SMOKE_CONFIG, {"loss_names": "sdm+plug_c"}))


@pytest.mark.parametrize("body, message", [
    ("x = 1 +\n", "importing it failed: SyntaxError"),
    ("import os\n\nraise RuntimeError('no GPU here')\n", "importing it failed, line 3: RuntimeError: no GPU here"),
    ("from model import register_loss\n\n@register_loss('sdm')\ndef f(out, cfg):\n    return 0\n",
     "importing it failed, line 3: ValueError: loss 'sdm' of .* is already registered by model.losses"),
    ("from utils.schema import Option\nfrom model import register_head\n\n"
     "@register_head('h_lr', options=[Option('lr', float, 1.0, 'clash')])\ndef f(cfg, ctx):\n    return None\n",
     "option 'lr' of .* is already declared by this project"),
], ids=["syntax", "raises", "loss-twice", "option-clash"])
def test_a_broken_plugin_is_one_line(tmp_path, capsys, body, message):
    path = plugin(tmp_path, "broken_plugin.py", body)
    out = tmp_path / "out"
    code, err = run_entry(train.main, ["--config_file", SMOKE_CONFIG, "--custom_imports", path, "--output_dir",
                                       str(out)], capsys)
    line = assert_one_error_line(code, err, f"custom_imports {path}")
    assert re.search(message, line), line
    assert not out.exists()


def test_a_missing_plugin_file_names_where_it_looked(tmp_path, capsys):
    config = tmp_path / "cfg" / "configs.yaml"
    config.parent.mkdir()
    config.write_text(open(SMOKE_CONFIG).read() + "custom_imports: [nowhere.py]\n")
    code, err = run_entry(train.main, ["--config_file", str(config)], capsys)
    assert_one_error_line(code, err, "custom_imports nowhere.py: no such file (looked for",
                          os.path.abspath("nowhere.py"), str(tmp_path / "cfg" / "nowhere.py"))


def test_a_plugin_next_to_its_config_is_found(tmp_path):
    folder = tmp_path / "experiment"
    folder.mkdir()
    plugin(folder, "plug_d.py", LOSS.format(name="plug_d"))
    text = open(SMOKE_CONFIG).read().replace("loss_names: sdm+itc+aux\n", "loss_names: sdm+plug_d\n")
    (folder / "configs.yaml").write_text(text + "custom_imports: [plug_d.py]\n")
    cfg = build_config(str(folder / "configs.yaml"))
    # Recorded by its absolute path: the run means this file wherever it is used later.
    assert cfg.plug_d_scale == 2.0 and cfg.custom_imports == [str((folder / "plug_d.py").resolve())]


def test_help_lists_a_plugins_options(tmp_path, capsys):
    path = plugin(tmp_path, "plug_e.py", LOSS.format(name="plug_e"))
    with pytest.raises(SystemExit) as done:
        train.main(["--config_file", SMOKE_CONFIG, "--custom_imports", path, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--lr (float, default 3e-06)" in out
    assert f"--plug_e_scale (float, default 2.0, from {path})" in out and "A scale." in out


class Stray(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cross = torch.nn.Linear(2, 2)  # 'cross' in its name: the reference's 5x rule must not apply


def test_a_parameter_no_group_claims_trains_at_the_base_lr_with_a_warning(php_log):
    cfg = build_config(SMOKE_CONFIG)
    model = build_model(cfg)
    model.stray = Stray()
    groups = build_param_groups(cfg, model)
    stray = {id(p) for p in model.stray.parameters()}
    lrs = {g["lr"] for g in groups for p in g["params"] if id(p) in stray}
    assert lrs == {cfg.lr, cfg.lr * cfg.bias_lr_factor}
    assert any("2 parameter(s) of stray belong to no learning-rate group" in message for message in php_log)


def test_builtins_register_like_plugins():
    from model.registry import ordered_heads
    from utils.plugins import load_methods
    load_methods()
    # Their parameters keep the order of the checkpoints written before the methods were packages.
    assert ordered_heads(list(HEADS))[:5] == ["php", "classifier", "mlm", "tse", "tbps"]
    assert set(LOSSES) >= {"itc", "sdm", "cmpm", "id", "mlm", "aux"}
    from datasets import DATASETS
    assert set(DATASETS) >= {"CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "Demo-PEDES", "custom"}


# ----------------------------------------------------------------------------------------------- custom data
def custom_cfg(path, **extra):
    return build_config(SMOKE_CONFIG, {"dataset_name": "custom", "annotation_file": str(path), **extra})


def test_custom_json_and_csv_give_the_same_data_set(demo_root, tmp_path):
    folder = os.path.join(demo_root, "Demo-PEDES")
    entries = json.load(open(os.path.join(folder, "reid_raw.json")))
    for e in entries:
        e["file_path"] = os.path.join(folder, "imgs", e["file_path"])
    (tmp_path / "mine.json").write_text(json.dumps(entries))
    lines = ["split,caption,id,file_path"] + [",".join([e["split"], '"' + c.replace('"', '""') + '"', str(e["id"]),
                                                        e["file_path"]]) for e in entries for c in e["captions"]]
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    from_json = dataset_from_config(custom_cfg(tmp_path / "mine.json"))
    from_csv = dataset_from_config(custom_cfg(tmp_path / "mine.csv"))
    demo = dataset_from_config(build_config(SMOKE_CONFIG, {"root_dir": demo_root}))
    for split in ("val", "test"):
        assert getattr(from_json, split) == getattr(from_csv, split) == getattr(demo, split)
    assert from_json.train == from_csv.train == demo.train


@pytest.mark.parametrize("content, message", [
    (None, "annotation_file {path} does not exist"),
    ("file_path,id,split\na.jpg,1,train\n", "the header must name the columns file_path, id, caption, split; missing "
                                            "caption"),
    ("file_path,id,caption,split\na.jpg,one,a man,train\n", "row 2: 'id' must be a decimal integer (digits only), got 'one'"),
    ("file_path,id,caption,split\na.jpg,1,a man,train\na.jpg,2,a man,train\n",
     "row 3: image 'a.jpg' has id 2 and split 'train' here but 1 and 'train' in an earlier row"),
    ("file_path,id,caption,split\na.jpg,1, ,train\n", "entry 0 (counting from 0): caption 0 (counting from 0) is "
                                                      "only white space"),
    ("file_path,id,caption,split\na.jpg,1,a man,train\n", "1 image(s) listed in {path} are missing"),
], ids=["missing", "header", "id", "disagree", "blank", "image"])
def test_custom_data_gets_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "mine.csv"
    if content is not None:
        path.write_text(content)
    code, err = run_entry(train.main, ["--config_file", SMOKE_CONFIG, "--dataset_name", "custom", "--annotation_file",
                                       str(path), "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, message.format(path=path))
    assert not (tmp_path / "out").exists()


def test_custom_without_annotation_file(tmp_path, capsys):
    code, err = run_entry(train.main, ["--config_file", SMOKE_CONFIG, "--dataset_name", "custom"], capsys)
    assert_one_error_line(code, err, "dataset_name custom needs --annotation_file FILE")
