"""The run configuration: one typed, flat schema with defaults and help text.

A run is described by a flat mapping from option name to value. The names are those of the command line and of
the reference codebases (IRRA, PHP), so their `configs.yaml` files and commands carry over. Values come from, in
order: the schema defaults below, a YAML file (`--config_file`), then `--key value` pairs on the command line.
An unknown key anywhere is an error that suggests the nearest valid name.

YAML is always read with a safe loader; the reference's `!!python/tuple` tags are read as lists.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import yaml

from utils.errors import UserError

LOSS_NAMES = ("itc", "sdm", "cmpm", "id", "mlm", "aux")
PHP_MODULES = ("none", "crfm", "efp", "crfm+efp")


def _opt(default, help: str, choices: Iterable | None = None):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclass
class Config:
    # --- the run -----------------------------------------------------------------------------------------
    name: str = _opt("php", "Run name; the run lives in <output_dir>/<dataset_name>/<name>/.")
    output_dir: str = _opt("logs", "Folder that holds all runs.")
    dataset_name: str = _opt("CUHK-PEDES", "Data set: CUHK-PEDES, ICFG-PEDES, RSTPReid or Demo-PEDES.",
                             ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "Demo-PEDES"))
    root_dir: str = _opt("./data", "Folder that holds the data set folders (<root_dir>/<dataset_name>/).")
    seed: int = _opt(1, "Seed of every random number generator (model init, samplers, augmentation, masking).")
    device: str = _opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    precision: str = _opt("fp32", "Autocast precision; master weights stay fp32.", ("fp32", "bf16", "fp16"))
    num_workers: int = _opt(4, "Data-loader worker processes.")
    log_period: int = _opt(100, "Iterations between log lines.")
    eval_period: int = _opt(1, "Epochs between evaluations on the validation split.")
    val_dataset: str = _opt("val", "Split used for model selection; 'test' is allowed but warned about.",
                            ("val", "test"))
    val_holdout_ids: int = _opt(0, "Hold out this many training identities as the validation split "
                                   "(for ICFG-PEDES, which has none). 0 keeps the splits as annotated.")
    skip_missing_images: bool = _opt(False, "Drop annotated images missing on disk (with a warning) instead of "
                                            "failing.")
    demo_seed: int = _opt(0, "Seed of the generated Demo-PEDES set.")
    resume: bool = _opt(False, "Continue the run from its last.pth (or resume_ckpt_file).")
    resume_ckpt_file: str = _opt("", "Checkpoint to resume from instead of <run>/last.pth.")
    overwrite: bool = _opt(False, "Start afresh in a run folder that already holds checkpoints, replacing them "
                                  "(without it, such a start is refused).")
    compat: str = _opt("auto", "Loading a run: 'none' (batch-independent embeddings), 'php_v1' (the reference "
                               "release's cross-batch EFP attention, to reproduce its numbers) or 'auto' "
                               "(php_v1 for published PHP checkpoints only).", ("auto", "none", "php_v1"))
    tensorboard: bool = _opt(True, "Write TensorBoard scalars to <run>/tensorboard.")
    skip_nonfinite_steps: int = _opt(0, "Tolerate up to this many steps with a non-finite loss (skipped) "
                                        "before stopping the run.")
    grad_checkpointing: bool = _opt(False, "Recompute backbone activations in backward to save memory.")
    torch_compile: bool = _opt(False, "torch.compile each transformer block of the backbone (regional "
                                      "compilation: seconds, not minutes). Fewer, fused kernels; the first "
                                      "steps and the first evaluation wait for the compiler.")
    max_grad_norm: float = _opt(0.0, "Clip the gradient norm to this value; 0 disables clipping.")
    # distributed (set from the torchrun environment; recorded in configs.yaml)
    distributed: bool = _opt(False, "Set automatically under torchrun.")
    world_size: int = _opt(1, "Number of processes; set automatically under torchrun.")
    local_rank: int = _opt(0, "Set automatically under torchrun.")
    gather_features: bool = _opt(True, "With several processes, the batch-level losses (itc, sdm, cmpm, the "
                                       "MoE balancing loss) see the global batch, gathered from every process, "
                                       "as in a single-process run on it; off: each process's own share.")
    batch_size_scope: str = _opt("global", "'global': batch_size is the batch of one optimizer step, split evenly "
                                           "over the processes (so it must divide by their number), and a config "
                                           "means the same at any process count; 'per_process': every process "
                                           "takes batch_size, the global batch is batch_size x processes.",
                                 ("global", "per_process"))
    training: bool = _opt(True, "Kept for reference configs; no effect.")

    # --- data --------------------------------------------------------------------------------------------
    img_size: List[int] = _opt([384, 128], "Image height and width.")
    img_aug: bool = _opt(True, "Flip, pad-and-crop and random erasing; off: flip only.")
    cache_images: bool = _opt(False, "Decode and resize every training image once, before training, and keep "
                                     "it in memory (H*W*3 bytes each: 147 KB at 384x128, ~5 GB for "
                                     "CUHK-PEDES); augmentation still runs per item. For when decoding limits "
                                     "the step, as on a 2-core CPU.")
    text_length: int = _opt(77, "Token context length.")
    vocab_size: int = _opt(49408, "Vocabulary size of the tokenizer (fixed by CLIP's BPE).")
    sampler: str = _opt("random", "Training sampler.", ("random", "identity"))
    num_instance: int = _opt(4, "Images per identity in a batch of the identity sampler (K of P x K).")
    batch_size: int = _opt(64, "Training batch size; with several processes see batch_size_scope.")
    test_batch_size: int = _opt(512, "Batch size when embedding the evaluation split.")
    MLM: bool = _opt(False, "Kept for reference configs; MLM inputs are built when 'mlm' is in loss_names.")
    masked_token_rate: float = _opt(0.8, "Share of chosen MLM tokens replaced by <|mask|>.")
    masked_token_unchanged_rate: float = _opt(0.1, "Share of chosen MLM tokens left unchanged.")

    # --- model -------------------------------------------------------------------------------------------
    pretrain_choice: str = _opt("ViT-B/16", "Backbone weights: a file path; 'ViT-B/16' (OpenAI's ViT-B-16.pt, "
                                            "searched in pretrained_dir and ~/.cache/clip); or an architecture "
                                            "name for random weights ('ViT-B-16', 'ViT-Demo').")
    pretrained_dir: str = _opt("./pretrained", "Folder searched for OpenAI's CLIP files (ViT-B-16.pt).")
    stride_size: int = _opt(16, "Patch stride; must equal the patch size (kept for reference configs).")
    temperature: float = _opt(0.02, "Contrastive temperature; logit scale = 1 / temperature (fixed).")
    loss_names: str = _opt("sdm+itc+aux", "Losses joined by '+': " + ", ".join(LOSS_NAMES) + ".")
    sdm_loss_weight: float = _opt(1.0, "Weight of the SDM loss.")
    itc_loss_weight: Optional[float] = _opt(None, "Weight of the ITC loss; empty: 5 with a PHP head (the PHP "
                                                  "reference), 1 without.")
    cmpm_loss_weight: float = _opt(1.0, "Weight of the CMPM loss.")
    id_loss_weight: float = _opt(1.0, "Weight of the ID loss.")
    mlm_loss_weight: Optional[float] = _opt(None, "Weight of the MLM loss; empty: 0.5 with a PHP head (the PHP "
                                                  "reference), 1 without.")
    aux_factor: float = _opt(3.0, "Weight of the MoE load-balancing loss.")
    cmt_depth: int = _opt(4, "Layers of the IRRA cross-modal transformer (MLM head).")
    php_modules: str = _opt("crfm+efp", "PHP head modules.", PHP_MODULES)
    cnum: int = _opt(9, "Part tokens of the CRFM (K).")
    num_experts: int = _opt(4, "Experts per EFP block.")
    topk: int = _opt(2, "Experts each token is routed to.")
    reduction: int = _opt(8, "Bottleneck reduction of each expert (D -> D / reduction).")
    moe_layers: int = _opt(4, "EFP blocks.")
    moe_heads: int = _opt(8, "Attention heads of each EFP block.")
    efp_attention: str = _opt("tokens", "EFP self-attention: 'tokens' among a sample's part tokens (batch "
                                        "independent), or 'batch' across the batch as in the PHP reference "
                                        "release (embeddings depend on batch mates; for study only).",
                              ("tokens", "batch"))
    crfm_mask_padding: bool = _opt(True, "Exclude text padding from the CRFM softmax (the reference did not).")
    gate_context: str = _opt("shared", "EFP gate context vector shared by both modalities (reference) or one "
                                       "per modality.", ("shared", "per_modality"))

    # --- solver ------------------------------------------------------------------------------------------
    optimizer: str = _opt("Adam", "Optimizer.", ("Adam", "AdamW", "SGD"))
    lr: float = _opt(3e-6, "Base learning rate.")
    bias_lr_factor: float = _opt(2.0, "Learning-rate factor of biases.")
    lr_factor: float = _opt(5.0, "Learning-rate factor of randomly initialised modules (cross-modal MLM "
                                 "modules, ID classifier, MLM head).")
    php_lr_factor: float = _opt(1.0, "Learning-rate factor of the PHP head (the reference trains it at 1).")
    moe_lr_factor: float = _opt(2.0, "Kept for reference configs; unused there and here (see php_lr_factor).")
    transformer_lr_factor: float = _opt(1.0, "Kept for reference configs; unused there and here.")
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(4e-5, "Weight decay.")
    weight_decay_bias: float = _opt(0.0, "Weight decay of biases.")
    alpha: float = _opt(0.9, "Adam/AdamW beta1.")
    beta: float = _opt(0.999, "Adam/AdamW beta2.")
    optimizer_eps: Optional[float] = _opt(None, "Adam/AdamW epsilon; empty: the reference's (Adam 1e-3, AdamW "
                                                "1e-8).")
    num_epoch: int = _opt(60, "Training epochs.")
    lrscheduler: str = _opt("cosine", "Schedule after warm-up.", ("step", "cosine", "poly", "exp", "linear"))
    milestones: List[int] = _opt([20, 50], "Epochs at which the step schedule multiplies the lr by gamma.")
    gamma: float = _opt(0.1, "Step-schedule factor (and exp-schedule base).")
    warmup_factor: float = _opt(0.1, "Learning-rate factor at the start of warm-up.")
    warmup_epochs: int = _opt(5, "Warm-up epochs.")
    warmup_method: str = _opt("linear", "Warm-up shape.", ("constant", "linear", "exp"))
    target_lr: float = _opt(0.0, "Final learning rate of the cosine, poly and linear schedules.")
    power: float = _opt(0.9, "Exponent of the poly schedule.")

    # --- derived helpers ---------------------------------------------------------------------------------
    @property
    def losses(self) -> List[str]:
        return [n for n in self.loss_names.split("+") if n]

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.dataset_name, self.name)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS.keys(), n=1, cutoff=0.5)
    if not close:
        close = [k for k in FIELDS if k.lower() == name.lower()]
    return f"; did you mean '{close[0]}'?" if close else ""


class _TupleSafeLoader(yaml.SafeLoader):
    """Safe loader that reads the reference's `!!python/tuple` tags as plain lists (nothing is executed)."""


_TupleSafeLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                                 lambda loader, node: loader.construct_sequence(node))


def read_yaml(path: str) -> Dict[str, Any]:
    """Read a flat YAML mapping safely; errors name the file (and position for syntax errors)."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f, Loader=_TupleSafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert a value (from YAML or a command-line string) to the type the schema declares for `key`."""
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None

    def fail(expected):
        raise UserError(f"{source}: option '{key}' expects {expected}, got {value!r}")

    if origin in (list, List):
        inner = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            fail("a list")
        try:
            return [inner(v) for v in value]
        except (TypeError, ValueError):
            fail(f"a list of {inner.__name__}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int,)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        fail("true or false")
    if hint is int:
        if isinstance(value, bool):
            fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            fail("an integer")
    if hint is float:
        if isinstance(value, bool):
            fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            fail("a number")
    if hint is str:
        if isinstance(value, (dict, list)):
            fail("a string")
        return str(value)
    return value


def validate(cfg: Config, source: str = "config") -> Config:
    """Check values that types alone do not constrain; raise UserError naming the key."""
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            raise UserError(f"{source}: option '{name}' must be one of {', '.join(choices)}; "
                            f"got {getattr(cfg, name)!r}")
    unknown = [n for n in cfg.losses if n not in LOSS_NAMES]
    if unknown or not cfg.losses:
        raise UserError(f"{source}: option 'loss_names' must join names from {', '.join(LOSS_NAMES)} with '+'; "
                        f"got {cfg.loss_names!r}")
    if len(cfg.img_size) != 2 or min(cfg.img_size) <= 0:
        raise UserError(f"{source}: option 'img_size' expects [height, width]; got {cfg.img_size!r}")
    if not 1 <= cfg.topk <= cfg.num_experts:
        raise UserError(f"{source}: option 'topk' must be between 1 and num_experts ({cfg.num_experts}); "
                        f"got {cfg.topk}")
    if "aux" in cfg.losses and "efp" not in cfg.php_modules:
        raise UserError(f"{source}: loss 'aux' needs the EFP (php_modules 'efp' or 'crfm+efp'); "
                        f"php_modules is {cfg.php_modules!r}")
    for key in ("batch_size", "test_batch_size", "num_epoch", "text_length", "eval_period", "num_instance"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{source}: option '{key}' must be positive; got {getattr(cfg, key)}")
    if cfg.sampler == "identity" and cfg.batch_size % cfg.num_instance:
        raise UserError(f"{source}: batch_size ({cfg.batch_size}) must be a multiple of num_instance "
                        f"({cfg.num_instance}) for the identity sampler")
    if cfg.temperature <= 0:
        raise UserError(f"{source}: option 'temperature' must be positive; got {cfg.temperature}")
    return cfg


def resolved_loss_weight(cfg: Config, name: str) -> float:
    """The effective weight of loss `name`, filling the reference defaults for unset ones."""
    if name == "aux":
        return cfg.aux_factor
    value = getattr(cfg, f"{name}_loss_weight")
    if value is None:
        php = cfg.php_modules != "none"
        value = {"itc": 5.0 if php else 1.0, "mlm": 0.5 if php else 1.0}[name]
    return float(value)


def apply(cfg: Config, values: Dict[str, Any], source: str) -> Config:
    """Set `values` on `cfg` after checking names and types."""
    for key, value in values.items():
        if key not in FIELDS:
            raise UserError(f"{source}: unknown option '{key}'{suggest(key)}")
        setattr(cfg, key, _coerce(key, value, source))
    return cfg


def parse_overrides(tokens: List[str]) -> Dict[str, Any]:
    """Turn ['--lr', '1e-5', '--img_size', '384', '128', '--img_aug', 'false'] into a dict of strings/lists.

    A flag followed directly by another flag (or nothing) means `true`, so `--img_aug` alone switches it on.
    """
    out: Dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise UserError(f"command line: expected an option starting with '--', got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            out[key] = value
            i += 1
            continue
        values = []
        i += 1
        while i < len(tokens) and not tokens[i].startswith("--"):
            values.append(tokens[i])
            i += 1
        if key not in FIELDS:
            raise UserError(f"command line: unknown option '--{key}'{suggest(key)}")
        out[key] = "true" if not values else (values[0] if len(values) == 1 else values)
    return out


def build_config(config_file: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                 check: bool = True) -> Config:
    """Defaults, then `config_file`, then `overrides`; returns a validated Config."""
    cfg = Config()
    if config_file:
        apply(cfg, read_yaml(config_file), config_file)
    if overrides:
        apply(cfg, overrides, "command line")
    return validate(cfg, config_file or "config") if check else cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as plain YAML (no tags), atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=True, default_flow_style=None)
    os.replace(tmp, path)
