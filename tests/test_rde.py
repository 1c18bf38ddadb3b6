"""RDE (SPEC 12) and the extension points it is built on: TAL and TSE against direct transcriptions of the formulas,
published RDE folders and their similarity, consensus division, noisy correspondence, the caption augmentation,
callbacks that resume exactly, named embeddings, attention maps, and the options a run writes."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from methods.rde.augment import rde_tokens
from datasets.noise import apply_noise, noise_permutation, read_noise_file
from helpers import same_final_weights, SMOKE_CONFIG, assert_one_error_line, build_dataset, run_entry, run_tool, train_argv, plain_smoke
from model import build_model, load_model
from model.attention import tower_attentions
from methods.rde.tal import tal_per_sample
from methods.rde.ccd import clean_probability, consensus, selection_report, split
from published_layout import write_published_run
from solver import param_lr_and_decay
import test as test_entry
import train
from utils.config import build_config
from utils.errors import UserError
from utils.tokenizer import EOT_ID, MASK_ID, SOT_ID

TINY_RDE = {"pretrain_choice": "ViT-Tiny", "img_size": [64, 32], "text_length": 16, "loss_names": "tal"}


# ------------------------------------------------------------------------------------------------ TAL
def tal_by_the_formula(image, text, pids, tau, margin):
    """SPEC 12, term by term, one sample at a time."""
    image, text = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    s = (text @ image.t()).double()
    out = []
    for i in range(len(pids)):
        total = 0.0
        for mat in (s, s.t()):
            positive = [j for j in range(len(pids)) if pids[i] == pids[j]]
            negative = [j for j in range(len(pids)) if pids[i] != pids[j]]
            weights = torch.softmax(torch.stack([mat[i, j] / tau for j in positive]), dim=0)
            pulled = sum(w * mat[i, j] for w, j in zip(weights, positive))
            pushed = sum(torch.exp(mat[i, j] / tau) for j in negative) if negative else torch.tensor(0.0).double()
            push = tau * torch.log(torch.clamp(pushed, max=1e36)) if negative else -math.inf
            total += max(float(margin - pulled + push), 0.0)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_tal_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g)
    for pids in (torch.tensor([0, 0, 1, 2, 2, 3]), torch.zeros(6, dtype=torch.long)):
        for tau, margin in ((0.015, 0.1), (0.5, 0.3)):
            ours = tal_per_sample(image, text, pids, tau, margin).double()
            assert torch.allclose(ours, tal_by_the_formula(image, text, pids, tau, margin), rtol=1e-5, atol=1e-6)


def test_tal_has_finite_gradients_without_negatives():
    image = torch.randn(4, 8, requires_grad=True)
    text = torch.randn(4, 8, requires_grad=True)
    tal_per_sample(image, text, torch.zeros(4, dtype=torch.long)).sum().backward()
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


# ------------------------------------------------------------------------------------------------ TSE
def reference_attention(block, x, causal):
    """The block's attention probabilities, averaged over heads, recomputed from its weights and its input."""
    h = block.ln_1(x)
    attn = block.attn
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    n, length, width = h.shape
    heads = attn.num_heads
    q = q.view(n, length, heads, -1).transpose(1, 2)
    k = k.view(n, length, heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if causal:
        scores = scores + torch.full((length, length), float("-inf")).triu(1)
    return scores.softmax(dim=-1).mean(dim=1)


def l2(x):
    return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-8)


def token_mlp(state, prefix, x):
    b, n, d = x.shape
    h = x.reshape(b * n, d) @ state[f"{prefix}mlp.layers.0.weight"].float().t() + state[f"{prefix}mlp.layers.0.bias"]
    mean, var = state[f"{prefix}mlp.bns.0.running_mean"], state[f"{prefix}mlp.bns.0.running_var"]
    h = (h - mean) / torch.sqrt(var + 1e-5) * state[f"{prefix}mlp.bns.0.weight"] + state[f"{prefix}mlp.bns.0.bias"]
    h = torch.relu(h) @ state[f"{prefix}mlp.layers.1.weight"].float().t() + state[f"{prefix}mlp.layers.1.bias"]
    return h.view(b, n, -1)


def linear(state, name, x):
    return x @ state[f"{name}.weight"].float().t() + state[f"{name}.bias"].float()


def reference_tse(state, tokens, attention, ids=None, ratio=0.3):
    """SPEC 12's TSE, written out from the reference's weights (its names) as the reference computes it."""
    a = attention.clone()
    b = tokens.shape[0]
    if ids is None:
        k = int((a.shape[1] - 1) * ratio)
        a[:, :, 0] = -1
        chosen = a[:, 0].topk(k, dim=-1)[1]
        prefix = "visul_emb_layer."
    else:
        k = int((a.shape[1] - 2) * ratio)
        eos = ids.argmax(dim=-1)
        a[torch.arange(b), :, eos] = -1
        a[torch.arange(b), :, 0] = -1
        chosen = (a[torch.arange(b), eos, :] * (ids != 0)).topk(k, dim=-1)[1]
        prefix = "texual_emb_layer."
    x = l2(torch.gather(tokens, 1, chosen.unsqueeze(-1).expand(b, k, tokens.shape[2])))
    first = linear(state, prefix + ("fc" if ids is None else "linear"), x)
    f = token_mlp(state, prefix, x) + first
    lengths = [k] * b if ids is None else [min(int((ids[i] != 0).sum()) - 2, k) for i in range(b)]
    return torch.stack([f[i, :lengths[i]].max(dim=0).values for i in range(b)])


def captions(n, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        words = [2, 5, 9, 13][i % 4]
        ids[i, 0] = SOT_ID
        ids[i, 1:1 + words] = torch.randint(1, MASK_ID, (words,), generator=g)
        ids[i, 1 + words] = EOT_ID
    return ids


@pytest.fixture(scope="module")
def published_rde(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rde") / "CUHK-PEDES" / "rde_run"
    config = write_published_run(str(folder), "rde", dataset_name="Demo-PEDES")
    state = torch.load(os.path.join(folder, "best.pth"), weights_only=True)["model"]
    return config, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def test_a_published_rde_run_reproduces_its_similarity(published_rde):
    """(S_bge + S_tse) / 2 of a checkpoint in the reference's layout (its names, fp16 weights), with TSE and the
    attention written out here, against the model's retrieval features: to 1e-4 relative."""
    config, state = published_rde
    run = load_model(config, compat="none")
    assert run.layout == "rde" and run.cfg.loss_names == "tal" and run.cfg.caption_augment == "rde"
    assert run.cfg.select_ratio == 0.3 and run.cfg.tau == 0.015 and run.model.similarity.names == ("global", "tse")
    model = run.model
    images, ids = torch.randn(5, 3, 64, 32, generator=torch.Generator().manual_seed(1)), captions(6)
    inputs = {}
    hooks = [blocks[-1].register_forward_pre_hook(lambda m, a, k, name=name: inputs.__setitem__(name, a[0]),
                                                  with_kwargs=True)
             for name, blocks in (("image", model.backbone.visual.transformer.resblocks),
                                  ("text", model.backbone.transformer.resblocks))]
    with torch.no_grad():
        image_features, text_features = model.features("image", images), model.features("text", ids)
        image = model.embed("image", images)
        image_attention = reference_attention(model.backbone.visual.transformer.resblocks[-1], inputs["image"], False)
        text = model.embed("text", ids)
        text_attention = reference_attention(model.backbone.transformer.resblocks[-1], inputs["text"], True)
        from model.backbone import image_tokens, text_tokens
        image_tse = reference_tse(state, image_tokens(model.backbone, images), image_attention)
        text_tse = reference_tse(state, text_tokens(model.backbone, ids), text_attention, ids)
    for hook in hooks:
        hook.remove()
    expected = (F.normalize(text["global"], dim=-1) @ F.normalize(image["global"], dim=-1).t()
                + F.normalize(text_tse, dim=-1) @ F.normalize(image_tse, dim=-1).t()) / 2
    ours = text_features @ image_features.t()
    assert torch.allclose(image["tse"], image_tse, rtol=1e-4, atol=1e-5)
    assert torch.allclose(text["tse"], text_tse, rtol=1e-4, atol=1e-5)
    assert ((ours - expected).abs() / expected.abs().clamp(min=1e-3)).max() < 1e-4


def test_the_similarity_is_selectable_at_test_time(published_rde):
    config, _ = published_rde
    names = {mode: load_model(config, compat="none", overrides={"rde_similarity": mode}).model.similarity.names
             for mode in ("fused", "bge", "tse")}
    assert names == {"fused": ("global", "tse"), "bge": ("global",), "tse": ("tse",)}


def test_run_sh_test_and_the_audit_on_a_published_rde_run(published_rde, demo_root, tmp_path, monkeypatch, capsys):
    config, _ = published_rde
    work = tmp_path / "work"
    shutil.copytree(os.path.dirname(config), work / "logs" / "CUHK-PEDES" / "rde_run")
    assert run_tool(["--root_dir", demo_root, "--test_batch_size", "32"], str(work), monkeypatch) == 0
    with open(work / "logs" / "summary.md") as f:
        assert "| logs/CUHK-PEDES/rde_run | Demo-PEDES | none |" in f.read()
    code, err = run_entry(test_entry.main, ["--config_file", str(work / "logs" / "CUHK-PEDES" / "rde_run" /
                                                                "configs.yaml"), "--root_dir", demo_root,
                                            "--audit", "--test_batch_size", "32"], capsys)
    assert code == 0, err  # BGE and TSE (BatchNorm in eval mode) depend on their own input only


def test_tse_pools_short_captions_over_their_words():
    from methods.rde.tse import TextSelection
    torch.manual_seed(0)
    layer = TextSelection(8, 16).eval()
    ids = captions(4, length=16)
    tokens, attention = torch.randn(4, 16, 8), torch.rand(4, 16, 16)
    state = {f"texual_emb_layer.{k}": v for k, v in layer.state_dict().items()}
    with torch.no_grad():
        assert torch.allclose(layer(tokens, attention, ids, 0.3), reference_tse(state, tokens, attention, ids),
                              atol=1e-6)


# ------------------------------------------------------------------------------------------------ models
def test_irra_and_php_features_are_the_cosine_of_their_embedding():
    cfg = build_config(SMOKE_CONFIG)
    model = build_model(cfg).eval()
    images = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(model.features("image", images), F.normalize(model.encode_image(images), dim=-1))
    assert model.feature_dim == model.embed_dim and not model.keeps_attention
    assert all(a.weights is None and not a.keep_weights for a in tower_attentions(model.backbone))


def test_attention_is_kept_only_when_a_head_asks_and_changes_no_embedding():
    torch.manual_seed(0)
    rde = build_model(build_config(None, TINY_RDE)).eval()
    plain = build_model(build_config(None, {**TINY_RDE, "loss_names": "itc"})).eval()
    plain.backbone.load_state_dict(rde.backbone.state_dict())
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        a, b = rde.encode_image(images), plain.encode_image(images)
    assert torch.allclose(a, b, atol=1e-5)
    kept = tower_attentions(rde.backbone)[0].weights
    assert kept.shape == (2, 9, 9) and torch.allclose(kept.sum(-1), torch.ones(2, 9), atol=1e-5)


def test_tse_trains_at_its_own_rate_biases_included():
    cfg = build_config(None, {**TINY_RDE, "lr": 1e-5})
    assert param_lr_and_decay("tse.image.fc.weight", cfg) == pytest.approx((1e-3, 4e-5))
    assert param_lr_and_decay("tse.image.fc.bias", cfg) == pytest.approx((1e-3, 0.0))
    assert param_lr_and_decay("backbone.visual.proj", cfg) == pytest.approx((1e-5, 4e-5))


# ------------------------------------------------------------------------------------------------ CCD
def test_split_and_consensus():
    assert split(np.array([0.2, 0.6, 0.9])).tolist() == [False, True, True]
    every = np.linspace(0.6, 0.99, 200)
    assert split(every).sum() == 200 - 3  # all above 0.5: the 1st percentile is the threshold
    g = torch.Generator().manual_seed(0)
    labels = consensus(np.array([1, 1, 0, 0] * 50, bool), np.array([1, 0, 1, 0] * 50, bool), g)
    assert labels[0::4].eq(1).all() and labels[3::4].eq(0).all()
    disagree = torch.cat([labels[1::4], labels[2::4]])
    assert 0.35 < disagree.mean() < 0.65  # a fair coin


def test_the_clean_component_is_the_low_loss_one():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(1.0, 0.1, 800), rng.normal(3.0, 0.2, 200)])
    p = clean_probability(losses, strong=True)
    assert p[:800].mean() > 0.95 and p[800:].mean() < 0.05
    report = selection_report(torch.from_numpy(split(p)).float(), np.arange(1000) < 800)
    assert report["precision"] > 0.99 and report["recall"] > 0.99 and report["kept"] == pytest.approx(0.8, abs=0.01)


# ------------------------------------------------------------------------------------------------ noise
def test_noise_permutes_a_share_of_the_captions(tiny_root, tmp_path):
    permutation = noise_permutation(1000, 0.5, seed=3)
    assert sorted(permutation.tolist()) == list(range(1000))
    moved = permutation != np.arange(1000)
    assert 480 <= moved.sum() <= 500 and np.array_equal(permutation, noise_permutation(1000, 0.5, seed=3))
    assert not np.array_equal(permutation, noise_permutation(1000, 0.5, seed=4))
    dataset = build_dataset("Demo-PEDES", tiny_root)
    captions_before = [p[3] for p in dataset.train]
    noisy = apply_noise(dataset, 0.5, seed=1)
    assert [p[3] for p in dataset.train] == [captions_before[j] for j in noisy.permutation]
    np.save(tmp_path / "index.npy", noisy.permutation)
    assert np.array_equal(read_noise_file(str(tmp_path / "index.npy"), len(dataset.train)), noisy.permutation)
    with pytest.raises(UserError, match="permutes 3 pairs but the training split has"):
        np.save(tmp_path / "short.npy", np.arange(3))
        read_noise_file(str(tmp_path / "short.npy"), len(dataset.train))


def test_rde_tokens_change_a_fifth_of_the_words_and_keep_sot_and_eot():
    ids = captions(1, length=40)[0]
    ids[1:30] = torch.randint(1, MASK_ID, (29,))
    ids[30] = EOT_ID
    changed = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = rde_tokens(ids)
        assert out.shape == ids.shape and out[0] == SOT_ID and (out == EOT_ID).sum() == 1
        n = int((out != 0).sum())
        assert out[n - 1] == EOT_ID and (out[n:] == 0).all()
        changed += int((out[1:30] != ids[1:30]).sum())
    torch.manual_seed(7)
    first = rde_tokens(ids)
    torch.manual_seed(7)
    assert torch.equal(first, rde_tokens(ids))
    assert 0.15 < changed / (200 * 29) < 0.7  # 20% chosen; a deletion also shifts the words after it


# ------------------------------------------------------------------------------------------------ training
def rde_argv(root, out, *extra):
    return train_argv(root, out, "--loss_names", "tal", "--caption_augment", "rde", "--noisy_rate", "0.5",
                      "--warmup_epochs", "0", *extra, config=plain_smoke())


def test_an_rde_run_records_its_selection_and_resumes_exactly(tiny_root, tmp_path, capsys):
    straight, chained = str(tmp_path / "straight"), str(tmp_path / "chained")
    code, err = run_entry(train.main, rde_argv(tiny_root, straight, "--num_epoch", "3"), capsys)
    assert code == 0, err
    code, err = run_entry(train.main, rde_argv(tiny_root, chained, "--num_epoch", "1"), capsys)
    assert code == 0, err
    code, err = run_entry(train.main, rde_argv(tiny_root, chained, "--num_epoch", "3", "--resume"), capsys)
    assert code == 0, err
    runs = [os.path.join(out, "Demo-PEDES", "smoke") for out in (straight, chained)]
    a, b = same_final_weights(straight, chained)
    assert torch.equal(a["callbacks"]["weights"]["ccd"], b["callbacks"]["weights"]["ccd"])
    history = [json.load(open(os.path.join(r, "history.json"))) for r in runs]
    assert [h["callbacks"] for h in history[0]] == [h["callbacks"] for h in history[1]]
    report = history[0][-1]["callbacks"]["ccd"]
    assert set(report) >= {"kept", "precision", "recall", "clean_share"} and report["clean_share"] == 0.5
    pairs = np.load(os.path.join(runs[0], "noisy_pairs.npy"))
    assert pairs.shape == (32,) and (pairs != np.arange(32)).sum() > 0
    with open(os.path.join(runs[0], "configs.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["tau"] == 0.015 and config["select_ratio"] == 0.3 and config["noisy_rate"] == 0.5


def test_a_run_writes_the_options_of_the_components_it_uses(smoke_run, tiny_root, tmp_path, capsys):
    with open(os.path.join(smoke_run, "configs.yaml")) as f:
        config = yaml.safe_load(f)
    assert not {"tau", "margin", "select_ratio", "rde_similarity", "rde_ccd", "tse_lr_factor"} & set(config)
    assert {"cnum", "num_experts", "noisy_rate"} <= set(config)
    code, err = run_entry(train.main, train_argv(tiny_root, str(tmp_path / "out"), "--tau", "0.05"), capsys)
    assert_one_error_line(code, err, "option 'tau' is set (0.05) but belongs to the loss 'tal', which this run does "
                                     "not use")
    assert not (tmp_path / "out").exists()
