"""The model: shapes, batch independence, every loss against hand-computed values, MoE routing, round trips."""
import math
import os
import warnings

import pytest
import torch

from helpers import batch, captions, tiny_cfg
from methods.irra import losses as irra_losses
from model import build_model, load_model, losses
from model.backbone import (ARCHITECTURES, build_backbone, build_clip, normalise_clip_state_dict,
                            resize_positional_embedding)
from model.layouts import map_published_state_dict
from model.loading import CompatibilityWarning
from methods.php.moe import MoE
from published_layout import SMALL, published_state_dict, write_published_run
from utils.checkpoint import save_checkpoint
from utils.config import build_config, save_config
from utils.errors import UserError


def test_shapes_and_loss_keys():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(loss_names="sdm+itc+aux+id+mlm+cmpm"), num_classes=2)
    b = batch(mlm=True)
    assert model.encode_image(b["images"]).shape == (4, 64)
    assert model.encode_text(b["caption_ids"]).dtype == torch.float32
    out = model(b)
    for key in ("sdm_loss", "itc_loss", "aux_loss", "id_loss", "mlm_loss", "cmpm_loss", "img_acc", "txt_acc",
                "mlm_acc", "temperature"):
        assert key in out and torch.isfinite(out[key]).all(), key
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    total.backward()
    assert model.php.crfm.part_tokens.grad is not None


def test_batch_mode_depends_on_batch_mates():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(efp_attention="batch")).eval()
    # Random weights start each expert as the identity; perturb them so the attention matters visibly.
    with torch.no_grad():
        for p in model.php.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        b = batch(6)
        full = model.encode_image(b["images"])
        single = torch.cat([model.encode_image(b["images"][k:k + 1]) for k in range(6)])
    assert (full - single).norm(dim=1).max() > 1e-3


def test_itc_hand_computed():
    i = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalisation makes these the same directions
    s = 2.0
    expected = math.log(1 + math.exp(-s))
    assert losses.itc_loss(i, t, s).item() == pytest.approx(expected, rel=1e-6)


def test_sdm_hand_computed():
    i = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pids = torch.tensor([7, 7])  # same identity: target 1/2 everywhere
    s = 1.0
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]
    row = sum(pj * (math.log(pj) - math.log(0.5 + 1e-8)) for pj in p)
    assert losses.sdm_loss(i, t, pids, s).item() == pytest.approx(2 * row, rel=1e-5)
    # Different identities: target is the identity matrix, so the KL against it is large but finite.
    different = losses.sdm_loss(i, t, torch.tensor([1, 2]), s).item()
    q_row = p[0] * (math.log(p[0]) - math.log(1 + 1e-8)) + p[1] * (math.log(p[1]) - math.log(1e-8))
    assert different == pytest.approx(2 * q_row, rel=1e-5)


def test_cmpm_hand_computed():
    i = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pids = torch.tensor([0, 1])
    # image_proj_text = i @ norm(t).T = [[2,0],[0,1]]; text_proj_image = t @ norm(i).T = [[1,0],[0,1]]
    def kl_row(logits, target_index):
        z = sum(math.exp(v) for v in logits)
        p = [math.exp(v) / z for v in logits]
        return sum(pj * (math.log(pj) - math.log((1.0 if j == target_index else 0.0) + 1e-8))
                   for j, pj in enumerate(p))
    i2t = (kl_row([2, 0], 0) + kl_row([0, 1], 1)) / 2
    t2i = (kl_row([1, 0], 0) + kl_row([0, 1], 1)) / 2
    assert losses.cmpm_loss(i, t, pids).item() == pytest.approx(i2t + t2i, rel=1e-5)


def test_id_and_mlm_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    pids = torch.tensor([0, 1])
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce1 = math.log(2)
    assert irra_losses.id_loss(logits, logits, pids).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert irra_losses.mlm_loss(logits, pids).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_moe_routing_and_balancing():
    torch.manual_seed(0)
    moe = MoE(dim=8, num_experts=4, topk=2, reduction=2).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        for e in moe.experts:  # make every expert distinct
            e.up.weight.normal_()
        moe.input_gate.weight.zero_()
        moe.context_gate.weight.zero_()
        # Gate logits depend on the context only: expert 2 gets 3*a, expert 0 gets 1*a, others 0.
        moe.context.zero_()
        moe.context[0, 0] = 1.0
        moe.context_gate.weight[2, 0] = 3.0
        moe.context_gate.weight[0, 0] = 1.0
        out, aux, counts = moe(x)
    a = 0.5
    w = torch.softmax(torch.tensor([3 * a, 1 * a]), dim=0)
    expected = w[0] * moe.experts[2](x) + w[1] * moe.experts[0](x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert counts.tolist() == [5, 0, 5, 0]
    # p = softmax([1.5, 0, 0.5, 0]) for every token, f = [1, 0, 1, 0]
    p = torch.softmax(torch.tensor([0.5, 0.0, 1.5, 0.0]), dim=0)
    assert aux.item() == pytest.approx(4 * ((p * torch.tensor([1.0, 0, 1, 0])).mean()).item(), rel=1e-6)


def test_batched_experts_equal_each_expert_forward_and_backward():
    # MoE.expert_deltas runs all experts as batched products over stacked weights; every parameter (norm, down,
    # up) made distinct per expert, it must give each Expert's own forward and the same gradients.
    torch.manual_seed(0)
    moe = MoE(dim=8, num_experts=3, topk=2, reduction=2).eval()
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.normal_()
    x = torch.randn(6, 8)
    results = []
    for run in (lambda t: moe.expert_deltas(t) + t, lambda t: torch.stack([e(t) for e in moe.experts])):
        xi = x.clone().requires_grad_()
        moe.zero_grad()
        out = run(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, xi.grad] + [p.grad.clone() for p in moe.experts.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batched_experts_draw_independent_dropout_per_expert():
    torch.manual_seed(0)
    moe = MoE(dim=64, num_experts=4, topk=2, reduction=2).train()
    with torch.no_grad():
        for e in moe.experts:
            e.up.weight.fill_(1.0)  # every output unit of every expert sees the same pre-dropout value
    deltas = moe.expert_deltas(torch.randn(50, 64)).detach()
    dropped = deltas == 0
    assert 0.05 < dropped.float().mean() < 0.15  # p = 0.1 on the output
    assert not torch.equal(dropped[0], dropped[1])


def test_balancing_loss_uniform_routing_is_k_over_e():
    moe = MoE(dim=8, num_experts=4, topk=2, reduction=2)
    with torch.no_grad():
        moe.input_gate.weight.zero_()
        moe.context_gate.weight.zero_()
    _, aux, _ = moe(torch.randn(10, 8))
    assert aux.item() == pytest.approx(2 / 4)


def test_experts_start_as_identity_and_usage_is_counted():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    expert = model.php.efp.blocks[0].moe.experts[0]
    x = torch.randn(3, 64)
    assert torch.equal(expert(x), x)
    model.reset_reports()
    with torch.no_grad():
        model.encode_image(batch(4)["images"])
    usage = model.php.expert_usage()
    assert set(usage) == {"image"}
    assert usage["image"].shape == (2, 4)
    assert usage["image"].sum(dim=1).tolist() == [4 * 3 * 2] * 2  # 4 samples x 3 parts x top-2


def test_text_padding_mask_changes_crfm_only_when_enabled():
    torch.manual_seed(0)
    masked = build_model(tiny_cfg(crfm_mask_padding=True)).eval()
    unmasked = build_model(tiny_cfg(crfm_mask_padding=False)).eval()
    unmasked.load_state_dict(masked.state_dict())
    ids = captions(2)
    longer = torch.cat([ids, torch.zeros(2, 8, dtype=torch.long)], dim=1)[:, :16]
    with torch.no_grad():
        assert torch.allclose(masked.encode_text(ids), masked.encode_text(longer))
        assert not torch.allclose(masked.encode_text(ids), unmasked.encode_text(ids))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(loss_names="sdm+id+mlm", php_modules="crfm+efp", name="rt", output_dir=str(tmp_path))
    model = build_model(cfg, num_classes=3).eval()
    run = tmp_path / "run"
    save_config(cfg, str(run / "configs.yaml"))
    save_checkpoint({"model": model.state_dict(), "epoch": 1}, str(run / "best.pth"))
    loaded = load_model(str(run / "configs.yaml"))
    b = batch(3)
    with torch.no_grad():
        assert torch.equal(model.encode_image(b["images"]), loaded.model.encode_image(b["images"]))
        assert torch.equal(model.encode_text(b["caption_ids"]), loaded.model.encode_text(b["caption_ids"]))
    assert loaded.compat == "none" and loaded.layout == "project" and not loaded.model.training
    assert loaded.checkpoint_path == str(run / "best.pth") and loaded.cfg.loss_names == "sdm+id+mlm"


def test_published_php_layout_loads_and_warns(tmp_path):
    cfg_file = write_published_run(str(tmp_path / "php"), "php_v1")
    with pytest.warns(CompatibilityWarning, match="ACROSS THE BATCH"):
        run = load_model(cfg_file)
    model = run.model
    assert run.compat == "php_v1" and run.layout == "php_v1"
    assert run.cfg.cnum == 9 and run.cfg.moe_layers == SMALL["moe_layers"]
    assert model.loss_weights == {"sdm": 1.0, "itc": 5.0, "aux": 3.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompatibilityWarning)
        independent_run = load_model(cfg_file, compat="none")
    assert independent_run.compat == "none" and independent_run.layout == "php_v1"
    independent = independent_run.model
    images = torch.randn(4, 3, *SMALL["img_size"])
    with torch.no_grad():
        moved = model.encode_image(images)[:2] - model.encode_image(images[:2])
        same = independent.encode_image(images)[:2] - independent.encode_image(images[:2])
    assert moved.norm() > 1e-3 and same.norm() < 1e-4


def test_published_irra_layout_loads(tmp_path):
    cfg_file = write_published_run(str(tmp_path / "irra"), "irra")
    run = load_model(cfg_file)
    model = run.model
    assert model.php is None and model.classifier.out_features == SMALL["num_classes"]
    assert model.mlm is not None and run.compat == "none" and run.layout == "irra"
    state = published_state_dict("irra", SMALL)
    w = state["base_model.visual.proj"].float()
    assert torch.equal(model.backbone.visual.proj.detach(), w)


def test_full_size_published_layouts_map_onto_the_model():
    for kind, overrides in (("php_v1", {"loss_names": "sdm+itc+aux", "php_modules": "crfm+efp"}),
                            ("irra", {"loss_names": "sdm+id+mlm"})):
        mapped = map_published_state_dict(published_state_dict(kind, device="meta"), kind, kind)
        cfg = build_config(None, {"pretrain_choice": "ViT-B-16", **overrides})
        with torch.device("meta"):
            model = build_model(cfg, num_classes=11003)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in mapped.items()}
        assert got == expected


def test_unknown_published_key_is_named(tmp_path):
    state = published_state_dict("irra", SMALL)
    state["surprise.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="surprise.weight"):
        map_published_state_dict(state, "ckpt", "irra")


def test_missing_pretrained_file_names_paths(tmp_path):
    with pytest.raises(UserError, match="ViT-B-16.pt"):
        build_backbone("ViT-B/16", (64, 32), 77, pretrained_dir=str(tmp_path))


def test_a_run_checkpoint_gives_its_backbone_to_a_new_run(smoke_run, tmp_path):
    """`--pretrain_choice logs/.../best.pth`: the run's backbone weights exactly, its heads left out."""
    ckpt = os.path.join(smoke_run, "best.pth")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert any(not k.startswith("backbone.") for k in saved)  # the smoke run has heads too
    cfg = build_config(os.path.join(smoke_run, "configs.yaml"))
    clip = build_backbone(ckpt, cfg.img_size, cfg.text_length)
    state = clip.state_dict()
    assert set(state) == {k[len("backbone."):] for k in saved if k.startswith("backbone.")} - {"logit_scale"}
    for key, value in state.items():
        assert torch.equal(value, saved["backbone." + key].float()), key


def test_backbone_from_openai_and_transformers_files(tmp_path):
    torch.manual_seed(0)
    source = build_clip(ARCHITECTURES["ViT-Tiny"], (32, 32), 77)  # a square 2x2 grid, like OpenAI's release
    torch.save(source.state_dict(), tmp_path / "clip.pt")
    clip = build_backbone(str(tmp_path / "clip.pt"), (64, 32), 77)
    assert clip.visual.positional_embedding.shape == (1 + 8, 64)
    expected = resize_positional_embedding(source.visual.positional_embedding.detach(), (4, 2))
    assert torch.allclose(clip.visual.positional_embedding, expected)
    # A Hugging Face transformers layout of the same weights gives the same model.
    sd = source.state_dict()
    hf = {"visual_projection.weight": sd["visual.proj"].t(), "text_projection.weight": sd["text_projection"].t(),
          "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
          "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
          "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
          "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
          "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
          "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
          "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
          "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
          "text_model.final_layer_norm.weight": sd["ln_final.weight"],
          "text_model.final_layer_norm.bias": sd["ln_final.bias"]}
    for tower, prefix in (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
                          ("transformer.resblocks.", "text_model.encoder.layers.")):
        for n in range(2):
            src = f"{tower}{n}."
            dst = f"{prefix}{n}."
            for kind in ("weight", "bias"):
                q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)
                hf[f"{dst}self_attn.q_proj.{kind}"], hf[f"{dst}self_attn.k_proj.{kind}"] = q, k
                hf[f"{dst}self_attn.v_proj.{kind}"] = v
                hf[f"{dst}self_attn.out_proj.{kind}"] = sd[f"{src}attn.out_proj.{kind}"]
                hf[f"{dst}layer_norm1.{kind}"] = sd[f"{src}ln_1.{kind}"]
                hf[f"{dst}layer_norm2.{kind}"] = sd[f"{src}ln_2.{kind}"]
                hf[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}mlp.c_fc.{kind}"]
                hf[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}mlp.c_proj.{kind}"]
    converted = normalise_clip_state_dict(hf)
    assert set(converted) == set(normalise_clip_state_dict(dict(sd)))
    for key, value in normalise_clip_state_dict(dict(sd)).items():
        assert torch.equal(converted[key], value), key
