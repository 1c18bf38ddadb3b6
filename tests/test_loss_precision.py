"""The losses run in float32 whatever the autocast precision (the references compute them in fp32): under bf16
autocast, itc, sdm and cmpm equal their fp32 formulas on the same embeddings, which bf16 matrix products of the
cosines would not (about 0.4% off in the loss and 1-2% in the gradient at temperature 0.02)."""
import torch

from helpers import SMOKE_CONFIG
from model import build_model, losses
from utils.config import build_config


def test_losses_under_bf16_autocast_are_fp32():
    torch.manual_seed(0)
    cfg = build_config(SMOKE_CONFIG, {"loss_names": "sdm+itc+cmpm", "temperature": "0.02"})
    model = build_model(cfg).eval()  # no dropout: the embeddings below are those the losses saw
    batch = {"images": torch.randn(8, 3, 64, 32), "pids": torch.tensor([0, 0, 1, 1, 2, 3, 4, 5]),
             "caption_ids": torch.randint(1, 1000, (8, 48))}
    batch["caption_ids"][:, 12], batch["caption_ids"][:, 13:] = 49407, 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        image = model.encode_image(batch["images"])
        text = model.encode_text(batch["caption_ids"])
    scale = 1 / cfg.temperature
    expected = {"itc": losses.itc_loss(image, text, scale), "sdm": losses.sdm_loss(image, text, batch["pids"], scale),
                "cmpm": losses.cmpm_loss(image, text, batch["pids"])}
    for name, value in expected.items():
        assert out[f"{name}_loss"].dtype == torch.float32
        torch.testing.assert_close(out[f"{name}_loss"], model.loss_weights[name] * value, rtol=1e-6, atol=0)
    # The same cosines in bf16 give visibly different losses: the test can tell the two apart.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = losses.sdm_loss(image, text, batch["pids"], scale)
    assert abs(float(in_bf16) - float(expected["sdm"])) > 1e-5 * float(expected["sdm"])
