"""A checkpoint never runs code nor changes the process: the cases of the issue "Trust, again" on checkpoints and
weight files, each crafted as it was reported (a legacy-format file with a payload, a BUILD onto torch's tensor
rebuilding, a TorchScript archive with a __setstate__, a six-byte memo bomb, a flipped byte in a start)."""
import io
import pickle
import struct
import sys
import tracemalloc
import types
import zipfile
from typing import Tuple

import pytest
import torch

from helpers import SMOKE, assert_one_error_line, run_entry, train_argv
import train
from model.backbone import build_backbone, build_clip, ARCHITECTURES, resize_text_positions
from utils import tensor_archive
from utils.checkpoint import read_checkpoint, save_checkpoint, weight_checksums
from utils.errors import UserError


class EasyDict(dict):
    """What TBPS-CLIP pickles its config as (a dict subclass of the module easydict)."""


EasyDict.__module__ = "easydict"


def save_with_easydict(obj, path, **kwargs):
    module = types.ModuleType("easydict")
    module.EasyDict = EasyDict
    sys.modules["easydict"] = module
    try:
        torch.save(obj, path, **kwargs)
    finally:
        del sys.modules["easydict"]


# -------------------------------------------------------------------------------- pickle opcodes, by hand
def text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


EASYDICT_FIRST = b"\x80\x02" + glob("easydict", "EasyDict") + b")\x81" + b"0"  # makes torch's loader retry here


def replace_data_pkl(path, data: bytes) -> None:
    """Rewrite a torch.save zip archive with another data.pkl (every other record kept)."""
    with zipfile.ZipFile(path) as z:
        records = {name: z.read(name) for name in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, content in records.items():
            z.writestr(name, data if name.endswith("/data.pkl") else content)


def archive_with(tmp_path, data: bytes, name="crafted.pth"):
    path = str(tmp_path / name)
    torch.save({"w": torch.ones(3)}, path)
    replace_data_pkl(path, data)
    return path


# ------------------------------------------------------------------------ 1. the legacy format's payload
def test_a_legacy_checkpoint_with_a_payload_never_runs_it(tmp_path, capsys):
    """A pre-zip torch.save file holding an EasyDict whose storage-keys pickle reduces eval: refused in one line,
    and the payload never ran (the old fallback read those pickles with plain pickle.load)."""
    marker = tmp_path / "ran"
    folder = tmp_path / "run"
    folder.mkdir()
    buffer = io.BytesIO()
    save_with_easydict({"model": {}, "config": EasyDict(a=1)}, buffer, _use_new_zipfile_serialization=False)
    keys = pickle.dumps([], protocol=2)
    raw = buffer.getvalue()
    assert raw.endswith(keys)
    payload = b"\x80\x02" + glob("builtins", "eval") + text(f"open({str(marker)!r}, 'w').write('x')") + b"\x85R."
    (folder / "best.pth").write_bytes(raw[:-len(keys)] + payload)
    (folder / "configs.yaml").write_bytes(open(SMOKE, "rb").read())
    with pytest.raises(UserError, match="legacy"):
        read_checkpoint(str(folder / "best.pth"))
    import test as test_entry
    code, err = run_entry(test_entry.main, ["--config_file", str(folder / "configs.yaml")], capsys)
    assert_one_error_line(code, err, "best.pth", "legacy")
    assert not marker.exists()


# ---------------------------------------------------------------- 2. a BUILD onto torch's own functions
def tamper_pickle() -> bytes:
    """EasyDict first, then BUILD {'__defaults__': ({'neg': True},)} as slot state onto _rebuild_tensor_v2."""
    neg = b"}" + text("neg") + b"\x88s" + b"\x85"  # ({'neg': True},)
    state = b"N}" + text("__defaults__") + neg + b"s" + b"\x86"  # (None, {'__defaults__': ...})
    return EASYDICT_FIRST + glob("torch._utils", "_rebuild_tensor_v2") + state + b"b0}."


def test_a_checkpoint_cannot_change_torch_for_the_files_after_it(tmp_path):
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    path = archive_with(tmp_path, tamper_pickle())
    with pytest.raises(UserError, match="refused: "):
        read_checkpoint(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults
    clean = str(tmp_path / "clean.pth")
    torch.save({"w": torch.ones(2)}, clean)
    loaded = read_checkpoint(clean)["w"]
    assert not loaded.is_neg() and torch.equal(loaded, torch.ones(2))


@pytest.mark.parametrize("body", [
    glob("torch._utils", "_rebuild_tensor_v2") + b"}" + text("x") + b"Ks" + b"b0}.",   # dict state on a function
    glob("collections", "OrderedDict") + b")R" + b"}" + text("__class__") + b"Ns" + b"b0}.",  # not _metadata
    glob("torch", "Size") + b")\x81" + b"0}.",                                          # NEWOBJ of a non-stand-in
    glob("torch", "device") + b"(" + text("cpu") + b"o0}.",                            # OBJ
    b"}" + text("k") + glob("torch", "device") + b"s" + text("x") + b"\x85R0}.",       # REDUCE on a stored global
    glob("easydict", "EasyDict") + b")\x81" + text("x") + b"a0}.",                     # APPEND onto a dict
])
def test_calls_and_state_on_anything_but_the_stand_ins_are_refused(tmp_path, body):
    path = archive_with(tmp_path, EASYDICT_FIRST + body)
    with pytest.raises(UserError, match=r"crafted\.pth: refused"):
        read_checkpoint(path)


def summary_metrics(folder, run):
    import csv
    with open(folder / "logs" / "summary.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["run"].endswith(run)]
    assert len(rows) == 1 and not rows[0]["note"], rows
    return {k: rows[0][k] for k in ("R1", "R5", "R10", "mAP", "mINP")}


def test_one_runs_files_cannot_change_anothers_numbers(smoke_run, tmp_path, monkeypatch):
    """`sh run.sh test` over a run whose plug-in sets the negative bit of every tensor torch loads afterwards,
    then a clean run: the clean run's numbers equal those it gets alone (each run in a process of its own)."""
    import shutil
    import yaml
    from helpers import run_tool
    plugin = tmp_path / "tamper.py"
    plugin.write_text("import torch\ntorch._utils._rebuild_tensor_v2.__defaults__ = ({'neg': True},)\n")
    bad, clean = tmp_path / "a_bad", tmp_path / "b_clean"
    for folder in (bad, clean):
        shutil.copytree(smoke_run, folder, ignore=shutil.ignore_patterns("*.jsonl", "test_results.json"))
    config = yaml.safe_load((bad / "configs.yaml").read_text())
    (bad / "configs.yaml").write_text(yaml.safe_dump({**config, "custom_imports": [str(plugin)]}))
    assert run_tool([str(clean)], tmp_path, monkeypatch) == 0
    alone = summary_metrics(tmp_path, "b_clean")
    run_tool([str(bad), str(clean)], tmp_path, monkeypatch)
    assert summary_metrics(tmp_path, "b_clean") == alone
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


# ---------------------------------------------------------------------------- 3. TorchScript archives
class Marker(torch.nn.Module):
    """A scripted module whose __setstate__ creates a file: proof that loading ran its code."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.path, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.weight = state[1]
        self.training = state[2]
        made = torch.from_file(state[0], True, 16, dtype=torch.uint8)
        made.fill_(65)
        self.path = state[0] + str(int(made[0]))


def test_a_torchscript_start_is_read_without_running_its_code(tmp_path, tiny_root, capsys):
    marker = tmp_path / "ran"
    path = str(tmp_path / "ViT-B-16.pt")
    torch.jit.script(Marker(str(marker))).save(path)
    code, err = run_entry(train.main, train_argv(tiny_root, str(tmp_path / "out"), "--pretrain_choice", path),
                          capsys)
    assert_one_error_line(code, err, "ViT-B-16.pt")
    assert not marker.exists()


class Node(torch.nn.Module):
    """A module tree in the shape of a state dict (TorchScript keeps parameters and buffers apart from the
    other tensor attributes a module holds, like OpenAI's attn_mask)."""

    def __init__(self, tensors):
        super().__init__()
        children = {}
        for key, value in tensors.items():
            head, _, rest = key.partition(".")
            if rest:
                children.setdefault(head, {})[rest] = value
            elif key == "attn_mask":
                self.attn_mask = value
            elif value.is_floating_point() and key != "mask_buffer":
                self.register_parameter(key, torch.nn.Parameter(value))
            else:
                self.register_buffer(key, value)
        for head, sub in children.items():
            self.add_module(head, Node(sub))

    def forward(self, x):
        return x


def test_a_torchscript_archive_gives_the_state_dict_jit_would(tmp_path):
    """A scripted CLIP of the tiny architecture, fp16 as OpenAI's release: the backbone built from it holds its
    weights in fp32; the archive's non-weight tensor attributes are left out, as jit's state_dict leaves them."""
    clip = build_clip(ARCHITECTURES["ViT-Tiny"], (32, 32), 77)
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()}
    extra = {"transformer.resblocks.0.attn_mask": torch.full((4, 4), float("-inf"))}
    path = str(tmp_path / "clip.pt")
    torch.jit.script(Node({**state, **extra})).save(path)
    read = tensor_archive.script_state_dict(path)
    assert set(read) == set(state) == set(torch.jit.load(path).state_dict())
    built = build_backbone(path, (32, 32), 77).state_dict()
    for key, value in state.items():
        assert built[key].dtype == torch.float32 and torch.equal(built[key], value.float()), key


# -------------------------------------------------------------------------------- 4. memory of the memo
def test_a_six_byte_memo_index_costs_nothing(tmp_path):
    path = archive_with(tmp_path, EASYDICT_FIRST + b"}r" + struct.pack("<I", 2 ** 26) + b".")
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="memo index"):
            read_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2 ** 20


def test_a_view_larger_than_its_storage_is_refused_in_both_readers(tmp_path):
    """A zero-stride view of a one-element storage claims 10**9 elements: any copy of it would allocate them."""
    plain_path, tbps_path = str(tmp_path / "plain.pth"), str(tmp_path / "tbps.pth")
    torch.save({"model": {"w": torch.zeros(1).expand(10 ** 9)}}, plain_path)
    save_with_easydict({"model": {"w": torch.zeros(1).expand(10 ** 9)}, "config": EasyDict()}, tbps_path)
    for path in (plain_path, tbps_path):
        with pytest.raises(UserError, match="larger than"):
            read_checkpoint(path)


# ---------------------------------------------------------------------------- refusals that name the cause
def numpy_scalar_pickle(dtype_name: str, codec: str = "latin1") -> bytes:
    dtype = glob("numpy", "dtype") + b"(" + text(dtype_name) + b"\x89\x88tR"
    encoded = glob("_codecs", "encode") + b"(" + text("\x00" * 8) + text(codec) + b"tR"
    return EASYDICT_FIRST + b"}" + text("lr") + glob("numpy.core.multiarray", "scalar") + b"(" + dtype + \
        encoded + b"tRs."


@pytest.mark.parametrize("dtype_name, codec, named", [("O", "latin1", "numpy dtype 'O'"),
                                                      ("f8", "rot13", "codec 'rot13'")])
def test_refused_numpy_dtypes_and_codecs_are_named(tmp_path, dtype_name, codec, named):
    path = archive_with(tmp_path, numpy_scalar_pickle(dtype_name, codec))
    with pytest.raises(UserError, match=f"refused: .*{named}"):
        read_checkpoint(path)


def test_the_allowed_numpy_scalar_reads_as_a_float(tmp_path):
    path = archive_with(tmp_path, numpy_scalar_pickle("f8"))
    assert read_checkpoint(path) == {"lr": 0.0}


# ------------------------------------------------------------------------------------ 7. starts verified
def flip_a_byte_of(path, tensor):
    raw = bytearray(open(path, "rb").read())
    at = raw.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0
    raw[at] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_a_damaged_start_is_refused(tmp_path, tiny_root, capsys):
    state = {f"backbone.{k}": v for k, v in build_clip(ARCHITECTURES["ViT-Tiny"], (32, 32), 77).state_dict().items()}
    path = str(tmp_path / "flipped.pth")
    save_checkpoint({"model": state, "weights_crc32": weight_checksums(state)}, path)
    flip_a_byte_of(path, state["backbone.visual.conv1.weight"])
    with pytest.raises(UserError, match=r"damaged checkpoint: weight backbone\.visual\.conv1\.weight"):
        build_backbone(path, (32, 32), 77)
    code, err = run_entry(train.main, train_argv(tiny_root, str(tmp_path / "out"), "--pretrain_choice", path),
                          capsys)
    assert_one_error_line(code, err, "flipped.pth", "damaged")


# -------------------------------------------------------------------------------- other starts, one line
def test_a_bad_safetensors_start_is_one_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError, match="bad.safetensors: not a readable safetensors file"):
        build_backbone(str(path), (32, 32), 77)


def test_a_tbps_checkpoint_starts_a_run_from_its_towers(tmp_path):
    """TBPS-CLIP's checkpoint_best.pth (EasyDict config, `encode_text.*` text tower) as a start: its towers
    load, without torch's advice to load it unsafely."""
    clip = build_clip(ARCHITECTURES["ViT-Tiny"], (32, 32), 16)
    state = {("encode_text." + k if not k.startswith("visual.") else k): v for k, v in clip.state_dict().items()}
    path = str(tmp_path / "checkpoint_best.pth")
    save_with_easydict({"model": {**state, "logit_scale": torch.tensor(4.0)}, "config": EasyDict(a=1)}, path)
    built = build_backbone(path, (32, 32), 16).state_dict()
    assert all(torch.equal(built[k], v) for k, v in clip.state_dict().items())


@pytest.mark.parametrize("trained, wanted", [(32, 48), (48, 77), (77, 32)])
def test_a_start_of_another_text_length_is_resized(tmp_path, trained, wanted):
    clip = build_clip(ARCHITECTURES["ViT-Tiny"], (32, 32), trained)
    path = str(tmp_path / "best.pth")
    torch.save({"model": {f"backbone.{k}": v for k, v in clip.state_dict().items()}}, path)
    table = build_backbone(path, (32, 32), wanted).positional_embedding.detach()
    assert torch.equal(table, resize_text_positions(clip.positional_embedding.detach(), wanted))
    expected = torch.nn.functional.interpolate(clip.positional_embedding.detach().t()[None], size=wanted,
                                               mode="linear", align_corners=False)[0].t()
    assert torch.allclose(table, expected if wanted > trained else clip.positional_embedding[:wanted])
