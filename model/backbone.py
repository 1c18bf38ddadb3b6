"""The CLIP backbone, built with open_clip, with every token projected to the joint space (SPEC 4).

Weights come from (a) a local OpenAI file (TorchScript archive or state dict), (b) an open_clip or Hugging Face
(transformers `CLIPModel`) checkpoint of the same model, or (c) random initialisation of a named architecture.
OpenAI's weights were trained with QuickGELU, so every tower here is built with it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from model.attention import use_tower_attention
from utils.checkpoint import read_checkpoint
from utils.errors import UserError

logger = logging.getLogger("php.model")

OPENAI_NAMES = {"ViT-B/16": "ViT-B-16.pt"}


@dataclass(frozen=True)
class ClipShape:
    """Every size needed to build the backbone; read from an architecture name or from a state dict."""
    embed_dim: int
    vision_width: int
    vision_layers: int
    patch_size: int
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int = 49408


# Random-weight architectures. ViT-B-16 is the paper's; the small ones serve the demo and the tests.
ARCHITECTURES: Dict[str, ClipShape] = {
    "ViT-B-16": ClipShape(512, 768, 12, 16, 512, 12, 77),
    # 192 wide (3 heads): about 0.58x the fp32 demo step of the former 256 on the 2-core Zen 4, which pays for 48
    # tokens and 18 epochs within the demo's ten minutes on a CPU that trains in fp32 (configs/demo.yaml).
    "ViT-Demo": ClipShape(192, 192, 4, 16, 192, 3, 77),
    "ViT-Tiny": ClipShape(64, 64, 2, 16, 64, 2, 77),
}


def _clip(shape: ClipShape, h: int, w: int, context_length: Optional[int], block_type: str) -> CLIP:
    vision = CLIPVisionCfg(layers=shape.vision_layers, width=shape.vision_width, head_width=64,
                           patch_size=shape.patch_size, image_size=(h, w), output_tokens=True, block_type=block_type)
    text = CLIPTextCfg(context_length=context_length or shape.context_length, vocab_size=shape.vocab_size,
                       width=shape.text_width, heads=max(1, shape.text_width // 64), layers=shape.text_layers,
                       block_type=block_type)
    clip = CLIP(shape.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    # The temperature is fixed (SPEC 4); an unused trainable scale would only confuse DDP and the optimizer.
    del clip.logit_scale
    return clip


def _accept_checkpoint_call(block: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: open_clip's Transformer checkpoints a block as `block(x, None, None, attn_mask)` (the
    default block's signature); its custom block takes `(x, attn_mask=...)`."""
    if len(args) == 4:
        return (args[0],), {**kwargs, "attn_mask": args[3]}
    return None


def build_clip(shape: ClipShape, img_size: Sequence[int], context_length: Optional[int] = None,
               fused_attention: bool = True) -> CLIP:
    """An open_clip CLIP (QuickGELU) for `img_size` (H, W), with attention heads = width // 64.

    With `fused_attention`, both towers use open_clip's 'custom' blocks, whose attention works on batch-first
    tensors directly (scaled_dot_product_attention on CUDA, model/attention.py on the CPU);
    nn.MultiheadAttention (the default blocks) adds transposes, copies and packed-projection bookkeeping around
    the same kernel (measured: a bf16 training step of the paper-size PHP model 1.46x faster on a 2-core CPU).
    Parameter names, and so state dicts, are the same for both block types, and the weights are exactly those of
    the default build (its initialisation and random stream), so only the speed changes.
    """
    h, w = int(img_size[0]), int(img_size[1])
    if h % shape.patch_size or w % shape.patch_size:
        raise UserError(f"img_size {h}x{w} is not a multiple of the backbone's patch size {shape.patch_size}")
    clip = _clip(shape, h, w, context_length, "default")
    if not fused_attention:
        return clip
    with torch.device("meta"):
        fused = _clip(shape, h, w, context_length, "custom")
    fused.load_state_dict(clip.state_dict(), strict=True, assign=True)
    fused.attn_mask = clip.attn_mask  # the one buffer outside the state dict
    use_tower_attention(residual_blocks(fused))
    for block in residual_blocks(fused):
        block.register_forward_pre_hook(_accept_checkpoint_call, with_kwargs=True)
    return fused


def residual_blocks(clip: CLIP) -> List[torch.nn.Module]:
    """The transformer blocks of both towers, text first."""
    return [*clip.transformer.resblocks, *clip.visual.transformer.resblocks]


def compile_blocks(clip: CLIP) -> None:
    """torch.compile each transformer block of both towers in place (regional compilation): the blocks of a
    tower are identical, so they share one compilation, which takes seconds instead of the minutes a whole-model
    compile takes; parameter names and the state dict are unchanged."""
    for block in residual_blocks(clip):
        block.compile()


def shape_from_state_dict(sd: Dict[str, torch.Tensor], prefix: str = "", source: str = "checkpoint") -> ClipShape:
    """Read the backbone's sizes from OpenAI/open_clip-named weights (optionally under `prefix`)."""
    def get(key):
        if prefix + key not in sd:
            raise UserError(f"{source} has no '{prefix + key}': not a CLIP ViT state dict")
        return sd[prefix + key]

    def count(tower):
        marker = f"{prefix}{tower}resblocks."
        return len({k[len(marker):].split(".")[0] for k in sd if k.startswith(marker)})

    conv = get("visual.conv1.weight")
    return ClipShape(embed_dim=get("text_projection").shape[1], vision_width=conv.shape[0],
                     vision_layers=count("visual.transformer."), patch_size=conv.shape[-1],
                     text_width=get("ln_final.weight").shape[0], text_layers=count("transformer."),
                     context_length=get("positional_embedding").shape[0],
                     vocab_size=get("token_embedding.weight").shape[0])


def image_tokens(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """All image tokens after ln_post and the projection: [B, 1 + gh*gw, D]; index 0 is the CLS token."""
    visual = clip.visual
    pooled, patches = visual(images)  # pooled = ln_post(CLS) @ proj; patches are ln_post-ed, not projected
    return torch.cat([pooled.unsqueeze(1), patches @ visual.proj], dim=1)


def text_tokens(clip: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """All text tokens after ln_final and the text projection: [B, L, D]."""
    x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
    x = clip.transformer(x, attn_mask=clip.attn_mask[: ids.shape[1], : ids.shape[1]])
    return clip.ln_final(x) @ clip.text_projection


def eot_features(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Global text feature: the token at the EOT position (the largest id in each row)."""
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), ids.argmax(dim=-1)]


# --------------------------------------------------------------------------------------------- weight files

def _read_weight_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from an OpenAI TorchScript archive (its tensors, its code never run), a torch state dict or
    checkpoint (weights only, checksums verified), or safetensors."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [''])[0][:120]})"
                            ) from None
    obj = read_checkpoint(path, torchscript=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _from_transformers(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a Hugging Face transformers `CLIPModel` state dict to OpenAI/open_clip names."""
    out: Dict[str, torch.Tensor] = {}
    towers = {"vision_model.encoder.layers.": "visual.transformer.resblocks.",
              "text_model.encoder.layers.": "transformer.resblocks."}
    simple = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_parts = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t()
        elif key == "logit_scale" or key.endswith("position_ids"):
            continue
        else:
            for src, dst in towers.items():
                if key.startswith(src):
                    idx, rest = key[len(src):].split(".", 1)
                    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                        kind = rest.rsplit(".", 1)[1]
                        base = f"{src}{idx}.self_attn."
                        if rest.startswith("self_attn.q_proj"):
                            out[f"{dst}{idx}.attn.in_proj_{kind}"] = torch.cat(
                                [sd[f"{base}{p}_proj.{kind}"] for p in ("q", "k", "v")])
                        break
                    for a, b in layer_parts.items():
                        if rest.startswith(a + "."):
                            out[f"{dst}{idx}.{b}.{rest[len(a) + 1:]}"] = value
                            break
                    break
    return out


def normalise_clip_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OpenAI / open_clip / transformers CLIP weights, or a run's checkpoint (this project's, IRRA-style or
    TBPS-CLIP's) -> open_clip names, fp32, without non-weight entries."""
    if any(k.startswith("module.") for k in sd):
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    for prefix in ("backbone.", "base_model."):
        if any(k.startswith(prefix) for k in sd):
            # A run of this project's, or an IRRA-style one (SPEC 17): another run starts from its backbone (its
            # heads are left out).
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if any(k.startswith("encode_text.") for k in sd) and any(k.startswith("visual.") for k in sd):
        # TBPS-CLIP's run: CLIP's text tower under `encode_text`, its own heads beside the towers
        sd = {k[len("encode_text."):] if k.startswith("encode_text.") else k: v for k, v in sd.items()
              if k.startswith(("encode_text.", "visual."))}
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        sd = _from_transformers(sd)
    drop = {"input_resolution", "context_length", "vocab_size", "logit_scale", "logit_bias"}
    return {k: v.float() for k, v in sd.items() if k not in drop and torch.is_tensor(v)}


def resize_positional_embedding(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Interpolate a [1 + g*g, C] square-grid position embedding to `grid` (bilinear), keeping the CLS row."""
    n = pos.shape[0] - 1
    if n == grid[0] * grid[1]:
        return pos
    side = int(round(n ** 0.5))
    if side * side != n:
        raise UserError(f"cannot interpolate a position embedding of {n} patches (not a square grid) to {grid}")
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


def resize_text_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    """A [L0, C] text position table for `length` tokens: its first rows when shorter (CLIP's own cut), else
    1-D linear interpolation along the positions, align_corners false (SPEC 16)."""
    if length <= pos.shape[0]:
        return pos[:length]
    return F.interpolate(pos.t().unsqueeze(0), size=length, mode="linear", align_corners=False)[0].t().contiguous()


def resolve_pretrained_path(choice: str, pretrained_dir: str) -> Optional[str]:
    """The weight file for `pretrain_choice`, None for a random-weight architecture name; errors name paths."""
    if choice in ARCHITECTURES:
        return None
    if choice in OPENAI_NAMES:
        fname = OPENAI_NAMES[choice]
        tried = [os.path.join(pretrained_dir, fname), os.path.join(os.path.expanduser("~/.cache/clip"), fname)]
        for path in tried:
            if os.path.isfile(path):
                return path
        raise UserError(f"pretrained CLIP weights for '{choice}' not found; looked in {' and '.join(tried)}. "
                        f"Copy OpenAI's {fname} there (or set --pretrain_choice to its path), or train from "
                        f"random weights with --pretrain_choice ViT-B-16")
    if os.path.isfile(choice):
        return choice
    raise UserError(f"pretrain_choice '{choice}': no such file, and not one of "
                    f"{', '.join(list(OPENAI_NAMES) + list(ARCHITECTURES))}")


def build_backbone(pretrain_choice: str, img_size: Sequence[int], context_length: int,
                   pretrained_dir: str = "./pretrained") -> CLIP:
    """Build the backbone for training: from a CLIP weight file or a random-weight architecture name."""
    path = resolve_pretrained_path(pretrain_choice, pretrained_dir)
    if path is None:
        logger.warning("backbone %s starts from random weights (no pretrained CLIP)", pretrain_choice)
        return build_clip(ARCHITECTURES[pretrain_choice], img_size, context_length)
    sd = normalise_clip_state_dict(_read_weight_file(path))
    shape = shape_from_state_dict(sd, source=path)
    clip = build_clip(shape, img_size, context_length)
    sd["visual.positional_embedding"] = resize_positional_embedding(sd["visual.positional_embedding"],
                                                                    clip.visual.grid_size)
    if context_length != sd["positional_embedding"].shape[0]:
        logger.info("text positions of %s: %d rows %s to %d", path, sd["positional_embedding"].shape[0],
                    "cut" if context_length < sd["positional_embedding"].shape[0] else "interpolated", context_length)
        sd["positional_embedding"] = resize_text_positions(sd["positional_embedding"], context_length)
    missing, unexpected = clip.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: does not match a CLIP ViT (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]})")
    logger.info("backbone loaded from %s (%d-layer ViT, width %d, patch %d)", path, shape.vision_layers,
                shape.vision_width, shape.patch_size)
    return clip
