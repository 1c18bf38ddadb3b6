"""open_clip_torch is pinned to one version because our code builds on its internals; these tests name each one.

model/backbone.py builds open_clip's CLIP with 'custom' blocks and reads its towers piece by piece,
model/attention.py subclasses its Attention, and model/irra_head.py, model/efp.py and utils/tokenizer.py take
smaller pieces. None of it is open_clip's public API: a release may rename an attribute (an error late in a run)
or change a mask, the pooling or what the vision tower returns (silently other embeddings and checkpoints that no
longer load). Before moving the pin in requirements.txt, run this file against the new version: a failure says
what changed and which of our files rely on it.
"""
import dataclasses
import functools
import gzip
import importlib
from importlib.metadata import version
import inspect
import os

import pytest
import torch

from helpers import ROOT, absolute_imports, project_files, requirement_specs

# A CLIP small enough to build in milliseconds: 2 heads per tower, 16x8 images in 8x8 patches (a 2x1 grid).
WIDTH, EMBED, CONTEXT, VOCAB, IMAGE = 128, 32, 6, 50, (16, 8)


def open_clip_imports():
    """{(module, name): [files]} for every import from open_clip in the project (name None: `import module`)."""
    found = {}
    for path in project_files():
        for module, name in absolute_imports(path):
            if module.split(".")[0] == "open_clip":
                found.setdefault((module, name), []).append(os.path.relpath(path, ROOT))
    return found


def test_installed_open_clip_is_the_pinned_version():
    pinned = requirement_specs().get("open-clip-torch")
    installed = version("open_clip_torch")
    users = sorted({f for files in open_clip_imports().values() for f in files if not f.startswith("tests")})
    assert pinned == f"=={installed}", (
        f"open_clip_torch {installed} is installed but requirements.txt asks for {pinned!r}: {', '.join(users)} "
        f"rely on open_clip internals that only the exact pinned version is checked for; if the other tests of "
        f"{os.path.relpath(__file__, ROOT)} pass with {installed}, pin open_clip_torch=={installed}")


def test_every_name_we_import_from_open_clip_exists():
    gone = []
    for (module, name), files in sorted(open_clip_imports().items(), key=str):
        target = module if name is None else f"{module}.{name}"
        try:
            found = importlib.import_module(module)
            if name is not None and not hasattr(found, name):
                importlib.import_module(target)  # `from package import submodule` needs no attribute yet
        except ImportError:
            gone.append(f"{target} (imported by {', '.join(sorted(files))})")
    assert not gone, f"open_clip_torch {version('open_clip_torch')} no longer has " + "; ".join(gone)


CHECKS = []


def relied_on_by(*files):
    """Register a check of open_clip: its docstring says what it checks, `files` which of ours rely on it."""
    def register(check):
        CHECKS.append(pytest.param(check, files, id=check.__name__))
        return check
    return register


def _has_parameters(fn, *names):
    missing = [n for n in names if n not in inspect.signature(fn).parameters]
    assert not missing, f"{fn.__qualname__} has no parameter {', '.join(missing)}"


@functools.lru_cache(maxsize=None)
def _clip(fused_attention: bool):
    from model.backbone import ClipShape, build_clip
    torch.manual_seed(0)
    shape = ClipShape(EMBED, WIDTH, 1, 8, WIDTH, 1, CONTEXT, VOCAB)
    return build_clip(shape, IMAGE, fused_attention=fused_attention).eval()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, *IMAGE, generator=gen)
    ids = torch.tensor([[1, 7, 30, VOCAB - 1, 0, 0], [1, 12, 5, 9, 22, VOCAB - 1]])  # EOT = the largest id
    return images, ids


@relied_on_by("model/backbone.py (_clip)")
def check_config_fields_and_constructor():
    """CLIPVisionCfg and CLIPTextCfg take the fields we set, and CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu)"""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    for cfg, names in ((CLIPVisionCfg, {"layers", "width", "head_width", "patch_size", "image_size", "output_tokens",
                                        "block_type"}),
                       (CLIPTextCfg, {"context_length", "vocab_size", "width", "heads", "layers", "block_type"})):
        missing = names - {f.name for f in dataclasses.fields(cfg)}
        assert not missing, f"{cfg.__name__} has no field {', '.join(sorted(missing))}"
    _has_parameters(CLIP.__init__, "embed_dim", "vision_cfg", "text_cfg", "quick_gelu")


@relied_on_by("model/backbone.py", "model/loading.py", "model/checkpoint_compat.py", "model/build.py")
def check_clip_parameters_keep_the_openai_layout():
    """a CLIP's state dict holds exactly the OpenAI-layout names and shapes (what published checkpoints hold)"""
    block = {"ln_1.weight": (WIDTH,), "ln_1.bias": (WIDTH,), "attn.in_proj_weight": (3 * WIDTH, WIDTH),
             "attn.in_proj_bias": (3 * WIDTH,), "attn.out_proj.weight": (WIDTH, WIDTH),
             "attn.out_proj.bias": (WIDTH,), "ln_2.weight": (WIDTH,), "ln_2.bias": (WIDTH,),
             "mlp.c_fc.weight": (4 * WIDTH, WIDTH), "mlp.c_fc.bias": (4 * WIDTH,),
             "mlp.c_proj.weight": (WIDTH, 4 * WIDTH), "mlp.c_proj.bias": (WIDTH,)}
    expected = {"positional_embedding": (CONTEXT, WIDTH), "text_projection": (WIDTH, EMBED),
                "token_embedding.weight": (VOCAB, WIDTH), "ln_final.weight": (WIDTH,), "ln_final.bias": (WIDTH,),
                "visual.class_embedding": (WIDTH,), "visual.positional_embedding": (3, WIDTH),
                "visual.proj": (WIDTH, EMBED), "visual.conv1.weight": (WIDTH, 3, 8, 8),
                "visual.ln_pre.weight": (WIDTH,), "visual.ln_pre.bias": (WIDTH,), "visual.ln_post.weight": (WIDTH,),
                "visual.ln_post.bias": (WIDTH,)}
    for tower in ("transformer.resblocks.0.", "visual.transformer.resblocks.0."):
        expected.update({tower + key: shape for key, shape in block.items()})
    for fused in (False, True):
        got = {key: tuple(value.shape) for key, value in _clip(fused).state_dict().items()}
        assert got == expected, (f"{'custom' if fused else 'default'} blocks: unexpected "
                                 f"{sorted(set(got.items()) - set(expected.items()))}, missing "
                                 f"{sorted(set(expected.items()) - set(got.items()))}")


@relied_on_by("model/backbone.py (build_clip, text_tokens, image_tokens)", "model/build.py", "train.py")
def check_clip_attributes():
    """CLIP has visual (proj, transformer.resblocks, grid_size, patch_size), transformer.resblocks,
    token_embedding, positional_embedding, ln_final, text_projection, vocab_size, a causal attn_mask buffer outside
    the state dict, and set_grad_checkpointing"""
    clip = _clip(True)
    assert clip.visual.grid_size == (2, 1) and tuple(clip.visual.patch_size) == (8, 8)
    assert len(clip.transformer.resblocks) == 1 and len(clip.visual.transformer.resblocks) == 1
    assert isinstance(clip.token_embedding, torch.nn.Embedding) and isinstance(clip.ln_final, torch.nn.LayerNorm)
    assert clip.vocab_size == VOCAB and callable(clip.set_grad_checkpointing)
    assert "attn_mask" in dict(clip.named_buffers()) and "attn_mask" not in clip.state_dict()
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    assert torch.equal(clip.attn_mask, causal), f"attn_mask is {clip.attn_mask}"
    assert not hasattr(clip, "logit_scale"), "build_clip deletes logit_scale; it is back"


@relied_on_by("model/backbone.py (build_clip)", "model/attention.py (use_tower_attention)")
def check_custom_blocks():
    """block_type='custom' builds CustomResidualAttentionBlock, forward(x, attn_mask), whose attn is open_clip's
    Attention (re-classed to our TowerAttention), with the default blocks' weights after loading their state dict"""
    from open_clip.transformer import CustomResidualAttentionBlock

    from model.attention import TowerAttention
    _has_parameters(CustomResidualAttentionBlock.forward, "x", "attn_mask")
    fused, plain = _clip(True), _clip(False)
    for block in [*fused.transformer.resblocks, *fused.visual.transformer.resblocks]:
        assert type(block) is CustomResidualAttentionBlock and type(block.attn) is TowerAttention
    for name, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], value), name


@relied_on_by("model/attention.py (TowerAttention)", "tests/test_attention.py")
def check_tower_attention_equals_attention():
    """Attention(dim, num_heads) keeps the attributes TowerAttention.matmul_attention reads, and on a small input
    with a causal and a per-head padding mask both give the same output and input gradient"""
    from open_clip.transformer import Attention

    from model.attention import TowerAttention
    _has_parameters(Attention.__init__, "dim", "num_heads")
    _has_parameters(Attention.forward, "x", "attn_mask")
    torch.manual_seed(0)
    reference = Attention(16, 2)
    for name in ("in_proj_weight", "in_proj_bias", "num_heads", "ln_q", "ln_k", "scale", "attn_drop",
                 "head_scale", "out_proj", "ln_inner", "out_drop", "logit_scale"):
        assert hasattr(reference, name), f"Attention has no attribute {name}"
    ours = TowerAttention(16, 2)
    ours.load_state_dict(reference.state_dict())
    padding = torch.zeros(3 * 2, 5, 5, dtype=torch.bool)
    padding[:, :, -1] = True
    for mask in (torch.full((5, 5), float("-inf")).triu(1), padding):
        x = torch.randn(3, 5, 16)
        got, want = [x.clone().requires_grad_() for _ in range(2)]
        out, expected = ours.matmul_attention(got, attn_mask=mask), reference(want, attn_mask=mask)
        (out * expected.detach()).sum().backward()
        (expected * expected.detach()).sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)


@relied_on_by("model/backbone.py (image_tokens)")
def check_vision_tower_output():
    """visual(images) with output_tokens returns (ln_post(CLS) @ proj [B, embed], ln_post(patch tokens)
    [B, gh*gw, width], unprojected)"""
    clip = _clip(True)
    images, _ = _inputs()
    seen = []
    hook = clip.visual.transformer.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        out = clip.visual(images)
    finally:
        hook.remove()
    assert isinstance(out, tuple) and len(out) == 2, f"visual(images) returns {type(out).__name__}"
    pooled, patches = out
    assert pooled.shape == (2, EMBED) and patches.shape == (2, 2, WIDTH), (pooled.shape, patches.shape)
    after_ln = clip.visual.ln_post(seen[0])
    torch.testing.assert_close(pooled, after_ln[:, 0] @ clip.visual.proj)
    torch.testing.assert_close(patches, after_ln[:, 1:])


@relied_on_by("model/backbone.py (text_tokens, eot_features)")
def check_text_tower_read_piece_by_piece():
    """token_embedding + positional_embedding, transformer(x, attn_mask=...), ln_final, @ text_projection at the
    largest id is CLIP.encode_text, for both block types"""
    from model.backbone import eot_features, text_tokens
    _, ids = _inputs()
    for fused in (False, True):
        clip = _clip(fused)
        torch.testing.assert_close(eot_features(text_tokens(clip, ids), ids), clip.encode_text(ids))


@relied_on_by("model/backbone.py (_accept_checkpoint_call)", "train.py (grad_checkpointing)")
def check_grad_checkpointing_calls_blocks_as_expected():
    """with set_grad_checkpointing, the towers call each block as block(x, None, None, attn_mask), which our hook
    turns into the custom block's call: the tokens and gradients equal those without checkpointing"""
    from model.backbone import text_tokens
    clip = _clip(True)
    _, ids = _inputs()
    results = []
    for enable in (False, True):
        clip.set_grad_checkpointing(enable)
        clip.zero_grad()
        try:
            tokens = text_tokens(clip, ids)
            tokens.square().sum().backward()
        finally:
            clip.set_grad_checkpointing(False)
        results.append([tokens.detach(), clip.token_embedding.weight.grad.clone()])
    for without, with_checkpoints in zip(*results):
        torch.testing.assert_close(with_checkpoints, without)


@relied_on_by("model/backbone.py (quick_gelu=True)", "model/efp.py", "model/irra_head.py")
def check_quick_gelu():
    """QuickGELU is x * sigmoid(1.702 x), and CLIP(quick_gelu=True) puts it in every block's mlp.gelu"""
    from open_clip.transformer import QuickGELU
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    clip = _clip(True)
    for block in [*clip.transformer.resblocks, *clip.visual.transformer.resblocks]:
        assert type(block.mlp.gelu) is QuickGELU, type(block.mlp.gelu)


@relied_on_by("model/irra_head.py (MLMHead)")
def check_transformer_for_the_mlm_head():
    """Transformer(width, layers, heads, act_layer=...) is batch-first, with blocks holding attn.in_proj_weight,
    attn.out_proj, mlp.c_fc and mlp.c_proj"""
    from open_clip.transformer import QuickGELU, Transformer
    torch.manual_seed(0)
    transformer = Transformer(32, 2, 2, act_layer=QuickGELU).eval()
    for block in transformer.resblocks:
        assert block.attn.in_proj_weight.shape == (96, 32) and block.attn.out_proj.weight.shape == (32, 32)
        assert block.mlp.c_fc.weight.shape == (128, 32) and block.mlp.c_proj.weight.shape == (32, 128)
    x = torch.randn(3, 5, 32)
    # batch-first: each sample's output depends on that sample only
    torch.testing.assert_close(transformer(x)[1:2], transformer(x[1:2]))


@relied_on_by("utils/tokenizer.py")
def check_tokenizer_pieces():
    """open_clip.tokenizer's BPE file (merge 48,894, the one we drop, is 'jeky ll</w>'), bytes_to_unicode,
    get_pairs, basic_clean, whitespace_clean, and SimpleTokenizer's word pattern (ours is it without the special
    tokens)"""
    from open_clip import tokenizer as oc

    from utils import tokenizer as ours
    lines = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")
    assert lines[0].endswith("#version: 0.2") and lines[48894] == "jeky ll</w>", (lines[0], lines[48894])
    table = oc.bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("a")] == "a" and table[ord(" ")] == "\u0120"
    assert oc.get_pairs(("a", "b", "c")) == {("a", "b"), ("b", "c")}
    assert oc.basic_clean(" A &amp;amp; B ") == "A & B" and oc.whitespace_clean(" a \n\t b ") == "a b"
    pattern = oc.SimpleTokenizer().pat.pattern
    assert pattern.endswith("|" + ours._WORD_PATTERN.pattern), pattern


@pytest.mark.parametrize("check, files", CHECKS)
def test_open_clip_internal(check, files):
    error = None
    try:
        check()
    except Exception as e:  # noqa: BLE001 - whatever broke, the report names the internal and our files
        error = e
    if error is not None:
        what = " ".join(inspect.getdoc(check).split())
        pytest.fail(f"open_clip_torch {version('open_clip_torch')}: no longer true that {what} "
                    f"({type(error).__name__}: {error}); relied on by {', '.join(files)}", pytrace=False)
