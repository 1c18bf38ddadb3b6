"""Evaluator and embed_loaders: embeddings, metrics equal to retrieval_metrics on the hand-built similarity, mode and
hooks."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from evaluation.embed import embed_loaders
from evaluation.evaluator import Evaluator
from evaluation.metrics import retrieval_metrics
from utils.errors import UserError

DIM, VOCAB, LENGTH = 8, 50, 6


class DictSet(Dataset):
    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


class FakeModel(torch.nn.Module):
    """Deterministic encoders; records the mode and autocast state it was called in."""

    def __init__(self, with_reset=True):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = torch.nn.Linear(3 * 4 * 2, DIM)
        self.token_embed = torch.nn.Embedding(VOCAB, DIM)
        self.frozen = torch.nn.Dropout(0.5)
        self.calls = []
        if with_reset:
            self.reset_reports = lambda: self.calls.append("reset")

    def encode_image(self, images):
        self.calls.append(("image", self.training, torch.is_autocast_enabled(images.device.type)))
        return self.image_proj(images.flatten(1)) * 3.0  # unnormalised on purpose

    def encode_text(self, caption_ids):
        self.calls.append(("text", self.training, torch.is_autocast_enabled(caption_ids.device.type)))
        return self.token_embed(caption_ids).sum(1)


def make_data(num_images=7, captions_per_image=2, num_ids=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image_pids = torch.arange(num_images) % num_ids
    images = torch.randn(num_images, 3, 4, 2, generator=gen)
    text_pids = image_pids.repeat_interleave(captions_per_image)
    captions = torch.randint(1, VOCAB, (len(text_pids), LENGTH), generator=gen)
    img_loader = DataLoader(DictSet(pids=image_pids, images=images), batch_size=3)
    txt_loader = DataLoader(DictSet(pids=text_pids, caption_ids=captions), batch_size=4)
    return img_loader, txt_loader, (images, image_pids, captions, text_pids)


def expected_similarity(model, images, captions):
    with torch.no_grad():
        image_feats = F.normalize(model.image_proj(images.flatten(1)) * 3.0, dim=-1)
        text_feats = F.normalize(model.token_embed(captions).sum(1), dim=-1)
    return text_feats @ image_feats.T, image_feats, text_feats


def test_embed_returns_normalised_cpu_features_in_loader_order():
    img_loader, txt_loader, (images, image_pids, captions, text_pids) = make_data()
    model = FakeModel()
    feats = Evaluator(img_loader, txt_loader).embed(model)
    _, image_feats, text_feats = expected_similarity(model, images, captions)
    assert feats["image_feats"].dtype == torch.float32 and feats["image_feats"].device.type == "cpu"
    assert torch.allclose(feats["image_feats"], image_feats, atol=1e-6)
    assert torch.allclose(feats["text_feats"], text_feats, atol=1e-6)
    assert torch.allclose(feats["text_feats"].norm(dim=1), torch.ones(len(text_pids)))
    assert torch.equal(feats["image_pids"], image_pids) and feats["image_pids"].dtype == torch.long
    assert torch.equal(feats["text_pids"], text_pids)
    assert not feats["image_feats"].is_inference()
    feats["text_feats"].mul_(2)  # ordinary tensors: callers may modify them
    raw = Evaluator(img_loader, txt_loader).embed(model, normalize=False)
    assert torch.allclose(raw["image_feats"], model.image_proj(images.flatten(1)).detach() * 3.0, atol=1e-5)


def test_metrics_equal_retrieval_metrics_on_the_similarity():
    img_loader, txt_loader, (images, image_pids, captions, text_pids) = make_data(num_images=10, num_ids=4)
    model = FakeModel()
    results, table = Evaluator(img_loader, txt_loader).evaluate(model)
    sim, _, _ = expected_similarity(model, images, captions)
    want = retrieval_metrics(sim, text_pids, image_pids)
    assert set(results) == {"t2i", "num_queries", "num_gallery"}
    assert results["num_queries"] == 20 and results["num_gallery"] == 10
    for key, value in want.items():
        assert results["t2i"][key] == pytest.approx(value, abs=1e-6), key
    assert [row[0] for row in table.rows] == ["t2i"]
    assert table.rows[0][1] == f"{want['R1']:.2f}"

    results, table = Evaluator(img_loader, txt_loader).evaluate(model, i2t=True)
    want_i2t = retrieval_metrics(sim.T, image_pids, text_pids)
    for key, value in want_i2t.items():
        assert results["i2t"][key] == pytest.approx(value, abs=1e-6), key
    assert [row[0] for row in table.rows] == ["t2i", "i2t"]


def test_mode_restored_and_reset_called_first():
    img_loader, txt_loader, _ = make_data()
    model = FakeModel()
    model.train()
    model.frozen.eval()  # a submodule kept in eval inside a training model stays so
    Evaluator(img_loader, txt_loader).evaluate(model)
    assert model.training and not model.frozen.training and model.image_proj.training
    assert model.calls[0] == "reset" and model.calls.count("reset") == 1
    assert all(not call[1] for call in model.calls[1:])  # encoders ran in eval mode
    assert {call[0] for call in model.calls[1:]} == {"image", "text"}

    model = FakeModel(with_reset=False)
    model.eval()
    Evaluator(img_loader, txt_loader).evaluate(model)
    assert not model.training and "reset" not in model.calls


def test_autocast_precision_and_logging(caplog):
    img_loader, txt_loader, _ = make_data()
    model = FakeModel()
    logger = logging.getLogger("test_evaluator")
    with caplog.at_level(logging.INFO, logger="test_evaluator"):
        feats_results, _ = Evaluator(img_loader, txt_loader, precision="bf16", logger=logger,
                                     desc="val").evaluate(model)
    assert all(call[2] for call in model.calls[1:])  # every encoder call under autocast
    assert "val results" in caplog.text and "t2i" in caplog.text and "mINP" in caplog.text
    feats = Evaluator(img_loader, txt_loader, precision="bf16").embed(model)
    assert feats["image_feats"].dtype == torch.float32
    assert torch.allclose(feats["image_feats"].norm(dim=1), torch.ones(7), atol=1e-5)

    model.calls.clear()
    Evaluator(img_loader, txt_loader, precision="fp32").embed(model)
    assert not any(call[2] for call in model.calls[1:])


def test_bad_precision_and_bad_batches():
    img_loader, txt_loader, _ = make_data()
    with pytest.raises(UserError, match="precision"):
        Evaluator(img_loader, txt_loader, precision="fp8")
    bad_loader = [{"pids": torch.tensor([0]), "pixels": torch.zeros(1, 3, 4, 2)}]
    with pytest.raises(UserError, match="images"):
        Evaluator(bad_loader, txt_loader).embed(FakeModel())
    with pytest.raises(UserError, match="no batches"):
        Evaluator([], txt_loader).embed(FakeModel())


def test_embed_loaders_of_one_kind_only():
    """The gallery cache embeds images alone: same embeddings as with the captions, and only their keys."""
    img_loader, txt_loader, _ = make_data()
    model = FakeModel()
    both = embed_loaders(model, img_loader, txt_loader, precision="bf16")
    images = embed_loaders(model, img_loader, precision="bf16")
    texts = embed_loaders(model, texts=txt_loader, precision="bf16")
    assert set(images) == {"image_feats", "image_pids"} and set(texts) == {"text_feats", "text_pids"}
    assert torch.equal(images["image_feats"], both["image_feats"])
    assert torch.equal(texts["text_feats"], both["text_feats"])
    assert model.calls.count("reset") == 3 and model.training  # restored after each call
    assert all(not call[1] and call[2] for call in model.calls if call != "reset")  # eval mode, autocast
