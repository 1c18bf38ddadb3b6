"""The backbone's fused-attention blocks and activation checkpointing change speed and memory, never results."""
import pytest
import torch

from model import build_model
from model.backbone import ARCHITECTURES, build_clip, image_tokens, text_tokens
from utils.config import build_config

IMG = (64, 32)
TEXT = 16


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, TEXT, dtype=torch.long)
    for b, n in enumerate((5, 9, 12, 14)):
        ids[b, 0], ids[b, 1:n], ids[b, n] = 49406, torch.randint(1, 49405, (n - 1,), generator=gen), 49407
    return {"images": torch.randn(4, 3, *IMG, generator=gen), "caption_ids": ids, "pids": torch.tensor([0, 0, 1, 2])}


def _model(fused: bool = True):
    cfg = build_config(None, {"pretrain_choice": "ViT-Tiny", "img_size": list(IMG), "text_length": TEXT,
                              "loss_names": "sdm+itc+aux", "php_modules": "crfm+efp", "cnum": 4, "moe_layers": 1})
    torch.manual_seed(0)
    backbone = build_clip(ARCHITECTURES["ViT-Tiny"], IMG, TEXT, fused_attention=fused)
    return build_model(cfg, backbone=backbone).train()


def _loss_and_grads(model, batch):
    torch.manual_seed(1)  # the same dropout masks in the PHP head on every call
    out = model(batch)
    loss = sum(v for k, v in out.items() if k.endswith("_loss"))
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, expected):
    """Equal up to float rounding: the largest difference within 1e-5 of the tensor's largest entry."""
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        scale = ref.abs().max().clamp(min=1e-12)
        assert (got[name] - ref).abs().max() <= 1e-5 * scale, name


def _saved_tensor_count(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def test_fused_blocks_have_the_default_weights_and_outputs():
    torch.manual_seed(0)
    default = build_clip(ARCHITECTURES["ViT-Tiny"], IMG, TEXT, fused_attention=False)
    torch.manual_seed(0)
    fused = build_clip(ARCHITECTURES["ViT-Tiny"], IMG, TEXT)
    assert type(fused.visual.transformer.resblocks[0]) is not type(default.visual.transformer.resblocks[0])
    sd_default, sd_fused = default.state_dict(), fused.state_dict()
    assert list(sd_default) == list(sd_fused)
    assert all(torch.equal(sd_default[k], sd_fused[k]) for k in sd_default)
    assert not any(t.is_meta for t in list(fused.parameters()) + list(fused.buffers()))
    batch = _batch()
    torch.testing.assert_close(image_tokens(fused, batch["images"]), image_tokens(default, batch["images"]))
    torch.testing.assert_close(text_tokens(fused, batch["caption_ids"]), text_tokens(default, batch["caption_ids"]))


def test_fused_blocks_give_the_same_training_gradients():
    batch = _batch()
    loss_d, grads_d = _loss_and_grads(_model(fused=False), batch)
    loss_f, grads_f = _loss_and_grads(_model(fused=True), batch)
    torch.testing.assert_close(loss_f, loss_d)
    _assert_same_grads(grads_f, grads_d)


@pytest.mark.parametrize("fused", [True, False])
def test_grad_checkpointing_same_gradients_fewer_saved_activations(fused):
    batch = _batch()
    model = _model(fused)
    loss_plain, grads_plain = _loss_and_grads(model, batch)
    saved_image = _saved_tensor_count(lambda: image_tokens(model.backbone, batch["images"]))
    saved_text = _saved_tensor_count(lambda: text_tokens(model.backbone, batch["caption_ids"]))
    model.backbone.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    # Both towers keep only their blocks' inputs, so far fewer tensors are saved for backward.
    assert _saved_tensor_count(lambda: image_tokens(model.backbone, batch["images"])) < saved_image / 2
    assert _saved_tensor_count(lambda: text_tokens(model.backbone, batch["caption_ids"])) < saved_text / 2
    torch.testing.assert_close(loss_ckpt, loss_plain)
    _assert_same_grads(grads_ckpt, grads_plain)
