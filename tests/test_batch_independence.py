"""Every model this project builds outside the compatibility mode embeds each sample from its own input only.

The grid covers every head variant; each model is checked in eval mode and in train mode with dropout off, for
both modalities: a batch's embeddings must equal those of each sample embedded alone and of the batch shuffled.
"""
import pytest
import torch

from model import build_model
from utils.config import build_config

# Each option value appears at least once, each PHP module set with both text-padding rules and both gates.
VARIANTS = [
    dict(php_modules="none", loss_names="sdm+id+mlm"),
    dict(php_modules="crfm", crfm_mask_padding=True, loss_names="sdm+itc"),
    dict(php_modules="crfm", crfm_mask_padding=False, loss_names="sdm+id+mlm"),
    dict(php_modules="efp", gate_context="per_modality", crfm_mask_padding=True, loss_names="sdm+itc+aux"),
    dict(php_modules="efp", gate_context="shared", crfm_mask_padding=False, loss_names="sdm+id+mlm"),
    dict(php_modules="crfm+efp", gate_context="shared", crfm_mask_padding=True, loss_names="sdm+itc+aux"),
    dict(php_modules="crfm+efp", gate_context="per_modality", crfm_mask_padding=False, loss_names="cmpm+id+mlm"),
]


def inputs(n=5):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(n, 16, dtype=torch.long)
    for i in range(n):
        length = 3 + 2 * i
        ids[i, 0], ids[i, length + 1] = 49406, 49407
        ids[i, 1:length + 1] = torch.randint(1, 49405, (length,), generator=g)
    return torch.randn(n, 3, 32, 16, generator=g), ids


def perturb(model):
    # Fresh experts are the identity and fresh heads are near-symmetric; random weights everywhere make any
    # dependence on batch mates show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_embeddings_do_not_depend_on_batch_mates(variant):
    torch.manual_seed(0)
    cfg = build_config(None, {"pretrain_choice": "ViT-Tiny", "img_size": [32, 16], "text_length": 16,
                              "moe_layers": 2, "cnum": 3, **variant})
    model = build_model(cfg, num_classes=3)
    perturb(model)
    images, ids = inputs()
    perm = torch.tensor([3, 0, 4, 1, 2])
    for train_mode in (False, True):
        model.train(train_mode)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        with torch.no_grad():
            for encode, x in ((model.encode_image, images), (model.encode_text, ids)):
                together = encode(x)
                alone = torch.cat([encode(x[k:k + 1]) for k in range(len(x))])
                shuffled = encode(x[perm])[torch.argsort(perm)]
                assert torch.allclose(together, alone, rtol=1e-4, atol=1e-5)
                assert torch.allclose(together, shuffled, rtol=1e-4, atol=1e-5)


def test_the_compatibility_mode_is_caught_by_the_same_check():
    torch.manual_seed(0)
    cfg = build_config(None, {"pretrain_choice": "ViT-Tiny", "img_size": [32, 16], "text_length": 16,
                              "loss_names": "sdm+itc+aux", "php_modules": "crfm+efp", "moe_layers": 2, "cnum": 3,
                              "efp_attention": "batch"})
    model = build_model(cfg).eval()
    perturb(model)
    images, ids = inputs()
    with torch.no_grad():
        for encode, x in ((model.encode_image, images), (model.encode_text, ids)):
            alone = torch.cat([encode(x[k:k + 1]) for k in range(len(x))])
            assert not torch.allclose(encode(x), alone, rtol=1e-4, atol=1e-5)
