"""Reading published run folders (the IRRA, PHP, RDE and TBPS-CLIP reference releases) into this project's model.

Key names are mapped explicitly, rule by rule. A key that no rule maps and that is not on the short ignore list
below is an error that names it. Published weights are mostly fp16; they are cast to fp32.

Ignored keys, and why:
- `safl.pos_embeding` (PHP): a parameter the reference defines but never uses.
- `shared_transformer.resblocks.N.feed_forward.expert_count_accum` / `token_count_accum` (PHP): the reference's
  routing counters; this project counts expert usage per evaluation instead (see model/php_head.py).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from utils.config import drop_retired
from utils.schema import COMPAT_MODES  # noqa: F401 - re-exported
from utils.errors import UserError, short_repr

PROJECT, PHP_V1, IRRA, RDE, TBPS = "project", "php_v1", "irra", "rde", "tbps"

_BLOCK = r"^shared_transformer\.resblocks\.(\d+)\."
_RULES: List[Tuple[str, str]] = [
    (r"^base_model\.", "backbone."),
    (r"^safl\.part_tokens$", "php.crfm.part_tokens"),
    (r"^safl\.feed\.0\.", "php.crfm.ffn.norm."),
    (r"^safl\.feed\.1\.", "php.crfm.ffn.fc1."),
    (r"^safl\.feed\.4\.", "php.crfm.ffn.fc2."),
    (_BLOCK + r"comb_param$", r"php.efp.blocks.\1.moe.context"),
    (_BLOCK + r"feed_forward\.alpha$", r"php.efp.blocks.\1.moe.alpha"),
    (_BLOCK + r"feed_forward\.input_gate\.weight$", r"php.efp.blocks.\1.moe.input_gate.weight"),
    (_BLOCK + r"feed_forward\.task_gate\.weight$", r"php.efp.blocks.\1.moe.context_gate.weight"),
    (_BLOCK + r"feed_forward\.experts\.(\d+)\.(norm|down|up)\.(weight|bias)$",
     r"php.efp.blocks.\1.moe.experts.\2.\3.\4"),
    (_BLOCK + r"(attn|ln_1|ln_2|ln_3|mlp)\.", r"php.efp.blocks.\1.\2."),
    (r"^classifier\.", "classifier."),
    (r"^(cross_attn|cross_modal_transformer|ln_pre_t|ln_pre_i|ln_post|mlm_head)\.", r"mlm.\1."),
    # RDE's TSE layers (its spelling): model/tse.py.
    (r"^visul_emb_layer\.", "tse.image."),
    (r"^texual_emb_layer\.", "tse.text."),
]
# TBPS-CLIP's model: CLIP's image tower as `visual`, its text tower as `encode_text`, its own two (model/tbps.py).
_TBPS_RULES: List[Tuple[str, str]] = [
    (r"^visual\.", "backbone.visual."),
    (r"^encode_text\.", "backbone."),
    (r"^logit_scale$", "tbps.logit_scale"),
    (r"^simclr_mlp\.", "tbps.simclr_mlp."),
    (r"^classifier\.", "classifier."),
    (r"^(cross_attn|cross_modal_transformer|ln_pre_t|ln_pre_i|ln_post|mlm_head)\.", r"mlm.\1."),
]
_IGNORED = [r"^safl\.pos_embeding$", _BLOCK + r"feed_forward\.(expert_count_accum|token_count_accum)$"]


def detect_layout(state_dict: Dict[str, Any], source: str) -> str:
    keys = list(state_dict)
    if any(k.startswith("backbone.") for k in keys):
        return PROJECT
    if any(k.startswith("base_model.") for k in keys):
        if any(k.startswith(("safl.", "shared_transformer.")) for k in keys):
            return PHP_V1
        return RDE if any(k.startswith(("visul_emb_layer.", "texual_emb_layer.")) for k in keys) else IRRA
    if any(k.startswith("visual.") for k in keys) and any(k.startswith("encode_text.") for k in keys):
        return TBPS
    raise UserError(f"{source}: not a checkpoint of this project, IRRA, PHP, RDE or TBPS-CLIP (no 'backbone.*', "
                    f"'base_model.*' or 'visual.*' + 'encode_text.*' weights; first keys: {keys[:3]})")


def map_published_state_dict(state_dict: Dict[str, torch.Tensor], source: str,
                             layout: str = IRRA) -> Dict[str, torch.Tensor]:
    """Rename a published (IRRA / PHP / RDE / TBPS-CLIP reference) state dict to this project's names, in fp32."""
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    rules = _TBPS_RULES if layout == TBPS else _RULES
    for key, value in state_dict.items():
        if any(re.match(p, key) for p in _IGNORED):
            continue
        for pattern, replacement in rules:
            if re.match(pattern, key):
                new_key = re.sub(pattern, replacement, key, count=1)
                break
        else:
            unknown.append(key)
            continue
        value = value.float() if value.is_floating_point() else value
        if new_key.endswith("moe.context") and value.dim() == 1:
            value = value.unsqueeze(0)  # the reference's one shared context vector
        out[new_key] = value
    if unknown:
        raise UserError(f"{source}: {len(unknown)} unexpected weight(s) in a published checkpoint: "
                        f"{', '.join(unknown[:5])}")
    return out


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


# The one mapping between how a run is loaded (compat) and how its EFP attends (efp_attention, SPEC 8).
_ATTENTION = {"none": "tokens", "php_v1": "batch"}


def efp_attention_for(compat: str, layout: str, configured: str) -> str:
    """The EFP attention a loaded run uses: compat's, or with 'auto' the reference's cross-batch attention for a
    published PHP checkpoint and the run's own setting otherwise."""
    if compat == "auto":
        return _ATTENTION[PHP_V1] if layout == PHP_V1 else configured
    return _ATTENTION[compat]


def compat_of(batch_dependent: bool) -> str:
    return PHP_V1 if batch_dependent else "none"


def translate_published_config(raw: Dict[str, Any], layout: str, source: str) -> Dict[str, Any]:
    """Config values of a published run, in this project's meaning (SPEC 8, 11). The reference's options that
    mean nothing here are dropped, and the log lists them (utils.config.drop_retired)."""
    values = dict(raw)
    if layout == RDE:
        values.update(translate_rde_config(values, source))  # before its retired txt_aug is dropped
    if layout == TBPS:
        values = translate_tbps_config(values, source)
    values, _ = drop_retired(values, f"{source} (published {layout} run)")
    # A published run's output_dir is its own folder and resume flags are those of its training: not ours.
    for key in ("output_dir", "resume", "resume_ckpt_file"):
        values.pop(key, None)
    if layout == PHP_V1:
        # How the reference trained: unmasked CRFM over text padding, one shared gate context, MLM x0.5.
        values.setdefault("crfm_mask_padding", False)
        values.setdefault("gate_context", "shared")
        values["efp_attention"] = "batch"
        if values.get("mlm_loss_weight") is not None:
            values["mlm_loss_weight"] = 0.5 * float(values["mlm_loss_weight"])
    elif layout == IRRA:
        values["php_modules"] = "none"
    return values


def translate_rde_config(values: Dict[str, Any], source: str = "configs.yaml") -> Dict[str, Any]:
    """An RDE configs.yaml in this project's terms: its `loss_names` (`TAL+sr0.3_tau0.015_margin0.1_n0.0`, the
    hyper-parameters spelled into the name) is the `tal` loss, whose options the file also holds (a key the file
    lacks takes the name's value; a key that contradicts the name is refused: which one trained is unknown);
    `txt_aug` is the caption augmentation `rde`; its noise file lay on its authors' machine (the noise rate stays,
    for the summary)."""
    loss_names = values.get("loss_names", "")
    names = [n.strip() for n in str(loss_names).split("+")]
    if not any(n.upper() == "TAL" for n in names):
        raise UserError(f"{source}: option 'loss_names' is {short_repr(loss_names)}; of published RDE runs only "
                        f"TAL runs are supported (SPEC 12)")
    out = {"loss_names": "tal", "php_modules": "none",
           "caption_augment": "rde" if values.get("txt_aug", False) else "none", "noisy_file": ""}
    for key, value in rde_name_options(names, loss_names, source).items():
        given = values.get(key)
        if given is None:
            out[key] = value
            continue
        number = _number(given)
        if number is not None and not math.isclose(number, value, rel_tol=1e-9, abs_tol=1e-12):
            raise UserError(f"{source}: option '{key}' is {short_repr(given)} but loss_names {short_repr(loss_names)} "
                            f"says {key} {value:g}; which one the run trained with is unknown: make them agree")
    return out


# The reference's run script spells these options into loss_names:
# TAL+sr<select_ratio>_tau<tau>_margin<margin>_n<noisy_rate>.
_RDE_NAME_KEYS = {"sr": "select_ratio", "tau": "tau", "margin": "margin", "n": "noisy_rate"}
_RDE_NAME_PART = re.compile(r"(sr|tau|margin|n)([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)")


def rde_name_options(names: List[str], loss_names: Any, source: str) -> Dict[str, float]:
    """{option: value} that the parts of an RDE loss_names after its losses spell (`sr0.3_tau0.015...`)."""
    found: Dict[str, float] = {}
    for part in names:
        if part.upper() == "TAL":
            continue
        for token in part.split("_"):
            match = _RDE_NAME_PART.fullmatch(token)
            if match is None:
                raise UserError(f"{source}: option 'loss_names' {short_repr(loss_names)} holds {short_repr(token)}, "
                                f"neither TAL (the one loss of RDE runs supported) nor one of the settings RDE spells "
                                f"into the name (sr, tau, margin or n, then a number)")
            key, value = _RDE_NAME_KEYS[match.group(1)], float(match.group(2))
            if key in found and found[key] != value:
                raise UserError(f"{source}: option 'loss_names' {short_repr(loss_names)} gives {key} twice "
                                f"({found[key]:g} and {value:g})")
            found[key] = value
    return found


def _number(value: Any) -> Optional[float]:
    """A config value as a float, None when it is not a number (the option's own check then names it)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# Losses TBPS-CLIP switches on by a flag of the same name in its `experiment` section.
_TBPS_LOSS_FLAGS = ("ritc", "citc", "ss", "id", "mlm")
_DATASETS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")


def looks_like_tbps_config(raw: Any) -> bool:
    """Whether a config file's values are TBPS-CLIP's nested ones (its `experiment` and `schedule` sections)."""
    return isinstance(raw, dict) and isinstance(raw.get("experiment"), dict) and isinstance(raw.get("schedule"), dict)


def translate_tbps_config(raw: Dict[str, Any], source: str = "config.yaml") -> Dict[str, Any]:
    """A TBPS-CLIP config (its config.yaml `source`, nested in misc / experiment / schedule / model / data) in this
    project's flat terms; what it names that means nothing here (device, paths on its authors' machine) is left
    out. A schedule value the translation computes with is checked here, naming its key as the file spells it."""
    exp, sched, model, data, misc = (_tbps_section(raw, name, source)
                                     for name in ("experiment", "schedule", "model", "data", "misc"))
    losses = ["nitc"] + [loss for loss in _TBPS_LOSS_FLAGS if exp.get(loss)]
    values: Dict[str, Any] = {
        "img_size": _tbps_resolution(exp.get("input_resolution", [224, 224]), source), "image_recipe": "tbps",
        "text_length": exp.get("text_length", 77), "caption_augment": "tbps",
        "text_attn_dropout": exp.get("dropout", 0.05), "freeze_patch_embed": True, "php_modules": "none",
        "loss_names": "+".join(losses), "mvs_image": bool(exp.get("mvs_image", True)),
        "softlabel_ratio": model.get("softlabel_ratio", 0.5), "ritc_eps": exp.get("ritc_eps", 1e-2),
        "nitc_loss_weight": exp.get("nitc_ratio", 1.0), "ritc_loss_weight": exp.get("ritc_ratio", 1.0),
        "citc_loss_weight": exp.get("citc_ratio", 0.1), "ss_loss_weight": exp.get("ss_ratio", 0.4),
        "citc_lambda1": exp.get("citc_lambda1", 0.25), "citc_lambda2": exp.get("citc_lambda2", 0.25),
        "simclr_temperature": exp.get("simclr_temperature", 0.1), "optimizer": "AdamW", "lr_step": "iteration",
        "no_decay_1d": True, "bias_lr_factor": 1.0, "lrscheduler": "cosine", "warmup_method": "linear",
        "batch_size_scope": "per_process"}
    values.update(_tbps_schedule(sched, source))
    for ours, theirs in (("batch_size", "batch_size"), ("test_batch_size", "test_batch_size"),
                         ("num_workers", "num_workers")):
        if theirs in data:
            values[ours] = data[theirs]
    if isinstance(misc.get("seed"), int):
        values["seed"] = misc["seed"]
    folder = os.path.basename(os.path.normpath(str(raw.get("anno_dir", ""))))
    if folder in _DATASETS:
        values["dataset_name"] = folder
    return values


def _tbps_section(raw: Dict[str, Any], name: str, source: str) -> Dict[str, Any]:
    """A section of a TBPS-CLIP config; one it lacks is empty (the defaults apply), one that is no mapping is an
    error rather than a silent fall back to every default."""
    value = raw.get(name)
    if value is None:  # absent, or a YAML section with nothing under it
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: TBPS-CLIP's '{name}' must be a mapping of its options; got {short_repr(value)}")
    return value


def _tbps_resolution(size: Any, source: str) -> List[Any]:
    if isinstance(size, int) and not isinstance(size, bool):
        return [size, size]
    if isinstance(size, (list, tuple)):
        return list(size)
    raise UserError(f"{source}: experiment.input_resolution must be a size or [height, width]; got "
                    f"{short_repr(size)}")


def _tbps_number(sched: Dict[str, Any], name: str, default: float, source: str, positive: bool = False) -> float:
    """schedule.<name> as a finite number (or the string of one: YAML 1.1 reads `1e-4` as a string, which the
    reference's float() accepts); positive, or 0 and more."""
    value = sched.get(name, default)
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number) or number < 0 or (positive and number == 0):
        expected = "a positive number" if positive else "a number, 0 or more"
        got = "nothing (null)" if value is None else short_repr(value)
        raise UserError(f"{source}: schedule.{name} must be {expected}; got {got}")
    return number


def _tbps_schedule(sched: Dict[str, Any], source: str) -> Dict[str, Any]:
    """The options of TBPS-CLIP's `schedule` section: lr, its per-iteration warm-up from lr_start (a factor of lr
    here) and cosine down to lr_end, AdamW's weight decay, betas and eps."""
    lr = _tbps_number(sched, "lr", 1e-4, source, positive=True)
    betas = sched.get("betas", [0.9, 0.98])
    if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise UserError(f"{source}: schedule.betas must be AdamW's two betas, [beta1, beta2], each 0 or more and "
                        f"below 1; got {short_repr(betas)}")
    return {"lr": lr, "num_epoch": sched.get("epoch", 5), "warmup_epochs": sched.get("epoch_warmup", 1),
            "warmup_factor": _tbps_number(sched, "lr_start", 1e-6, source) / lr,
            "target_lr": _tbps_number(sched, "lr_end", 5e-6, source),
            "weight_decay": _tbps_number(sched, "weight_decay", 0.02, source),
            "optimizer_eps": _tbps_number(sched, "eps", 1e-8, source), "alpha": betas[0], "beta": betas[1]}


def head_sizes(state_dict: Dict[str, torch.Tensor], dim: int) -> Dict[str, Any]:
    """PHP / IRRA head options implied by the weights (the part that cannot be read is left to the config)."""
    keys = state_dict.keys()

    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})

    sizes: Dict[str, Any] = {}
    has_crfm = "php.crfm.part_tokens" in state_dict
    has_efp = any(k.startswith("php.efp.") for k in keys)
    sizes["php_modules"] = {(False, False): "none", (True, False): "crfm", (False, True): "efp",
                            (True, True): "crfm+efp"}[(has_crfm, has_efp)]
    if has_crfm:
        sizes["cnum"] = state_dict["php.crfm.part_tokens"].shape[0]
    if has_efp:
        sizes["moe_layers"] = count("php.efp.blocks.")
        sizes["num_experts"] = count("php.efp.blocks.0.moe.experts.")
        sizes["reduction"] = dim // state_dict["php.efp.blocks.0.moe.experts.0.down.weight"].shape[0]
        contexts = state_dict["php.efp.blocks.0.moe.context"].shape[0]
        sizes["gate_context"] = "per_modality" if contexts == 2 else "shared"
    if any(k.startswith("mlm.") for k in keys):
        sizes["cmt_depth"] = count("mlm.cross_modal_transformer.resblocks.")
    if "tse.image.fc.weight" in state_dict and state_dict["tse.image.fc.weight"].shape[0] != 2 * dim:
        raise UserError(f"TSE layers of width {state_dict['tse.image.fc.weight'].shape[0]}; this project's TSE is "
                        f"2 x the embedding width ({2 * dim})")
    return sizes
