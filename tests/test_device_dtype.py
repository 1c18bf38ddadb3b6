"""GPU conditions emulated on the CPU: no tensor is made on a fixed device, and no op meets mixed dtypes.

CI has no GPU, and two faults that only a GPU run showed once (a loss-dict tensor created on the CPU; a MoE
scatter of fp32 weights into bf16 gates) are caught here instead:
- on the 'meta' device, any tensor the forward pass creates on the CPU is mixed with meta tensors and raises;
- CUDA's autocast runs LayerNorm in fp32 (its output is fp32 while every Linear gives bf16), which CPU autocast
  does not; forward hooks that give every LayerNorm an fp32 output reproduce that policy.
"""
import pytest
import torch
import torch.fx.experimental._config  # noqa: F401
import torch.nn as nn

from helpers import batch, tiny_cfg
from model import build_model

PRESETS = {
    "php": dict(php_modules="crfm+efp", loss_names="sdm+itc+aux"),
    "php_padding_mask": dict(php_modules="crfm+efp", crfm_mask_padding=True, loss_names="sdm+itc+aux"),
    "irra": dict(php_modules="none", loss_names="sdm+id+mlm"),
    "cmpm": dict(php_modules="efp", loss_names="cmpm+id"),
}


def total_loss(out):
    return sum(v for k, v in out.items() if k.endswith("_loss"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_forward_and_backward_on_the_meta_device(preset, monkeypatch):
    # Boolean indexing (MLM labels, the MoE's padding mask) has no meta shape of its own; torch builds that have
    # the switch let it assume every element selected, others cannot run those presets on meta.
    config = torch.fx.experimental._config
    if hasattr(config, "meta_nonzero_assume_all_nonzero"):
        monkeypatch.setattr(config, "meta_nonzero_assume_all_nonzero", True)
    model = build_model(tiny_cfg(**PRESETS[preset]), num_classes=4).to("meta").train()
    inputs = {k: v.to("meta") for k, v in batch(4, mlm=True).items()}
    try:
        out = model(inputs)
    except (NotImplementedError, AttributeError) as e:  # some builds hide the switch and fail reading it
        if "nonzero" not in str(e):
            raise
        pytest.skip(f"this torch build has no meta kernel for nonzero: {e}")
    assert all(v.device.type == "meta" for v in out.values())
    total_loss(out).backward()
    model.eval()
    with torch.inference_mode():
        assert model.encode_image(inputs["images"]).device.type == "meta"
        assert model.encode_text(inputs["caption_ids"]).device.type == "meta"


def layer_norms_in_fp32(model):
    """Give every LayerNorm an fp32 output, as CUDA autocast does."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(lambda mod, args, output: output.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cuda_autocast_policy_trains_and_embeds(preset, dtype):
    model = build_model(tiny_cfg(**PRESETS[preset]), num_classes=4).train()
    layer_norms_in_fp32(model)
    inputs = batch(4, mlm=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(inputs)
    loss = total_loss(out)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(model.encode_image(inputs["images"]).float()).all()
        assert torch.isfinite(model.encode_text(inputs["caption_ids"]).float()).all()
