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
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import yaml

from utils.errors import UserError, short_repr
from utils.files import write_atomic

LOSS_NAMES = ("itc", "sdm", "cmpm", "id", "mlm", "aux")
PHP_MODULES = ("none", "crfm", "efp", "crfm+efp")


def _opt(default, help: str, choices: Iterable | None = None, minimum: float | None = None,
         positive: bool = False):
    """A schema field: its default, help text, allowed values, and lower bound (`minimum`, or > 0 if `positive`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum, "positive": positive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- the run -----------------------------------------------------------------------------------------
    name: str = _opt("php", "Run name; the run lives in <output_dir>/<dataset_name>/<name>/.")
    output_dir: str = _opt("logs", "Folder that holds all runs.")
    dataset_name: str = _opt("CUHK-PEDES", "Data set: CUHK-PEDES, ICFG-PEDES, RSTPReid or Demo-PEDES.",
                             ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "Demo-PEDES"))
    root_dir: str = _opt("./data", "Folder that holds the data set folders (<root_dir>/<dataset_name>/).")
    seed: int = _opt(1, "Seed of every random number generator (model init, samplers, augmentation, masking).",
                     minimum=0)
    device: str = _opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    precision: str = _opt("fp32", "Autocast precision; master weights stay fp32.", ("fp32", "bf16", "fp16"))
    num_workers: int = _opt(4, "Data-loader worker processes.", minimum=0)
    log_period: int = _opt(100, "Iterations between log lines.", positive=True)
    eval_period: int = _opt(1, "Epochs between evaluations on the validation split.", positive=True)
    val_dataset: str = _opt("val", "Split used for model selection; 'test' is allowed but warned about.",
                            ("val", "test"))
    val_holdout_ids: int = _opt(0, "Hold out this many training identities as the validation split "
                                   "(for ICFG-PEDES, which has none). 0 keeps the splits as annotated.", minimum=0)
    skip_missing_images: bool = _opt(False, "Drop annotated images missing on disk (with a warning) instead of "
                                            "failing.")
    demo_seed: int = _opt(0, "Seed of the generated Demo-PEDES set (seed N > 0: <root_dir>/Demo-PEDES_seed<N>).",
                          minimum=0)
    resume: bool = _opt(False, "Continue the run from its last.pth (or resume_ckpt_file).")
    resume_ckpt_file: str = _opt("", "Checkpoint to resume from instead of <run>/last.pth.")
    overwrite: bool = _opt(False, "Start afresh in a run folder that already holds checkpoints, replacing them "
                                  "(without it, such a start is refused).")
    compat: str = _opt("auto", "Loading a run: 'none' (batch-independent embeddings), 'php_v1' (the reference "
                               "release's cross-batch EFP attention, to reproduce its numbers) or 'auto' "
                               "(php_v1 for published PHP checkpoints only).", ("auto", "none", "php_v1"))
    tensorboard: bool = _opt(True, "Write TensorBoard scalars to <run>/tensorboard.")
    skip_nonfinite_steps: int = _opt(0, "Tolerate up to this many steps with a non-finite loss (skipped) "
                                        "before stopping the run.", minimum=0)
    grad_checkpointing: bool = _opt(False, "Recompute backbone activations in backward to save memory.")
    torch_compile: bool = _opt(False, "torch.compile each transformer block of the backbone (regional "
                                      "compilation: seconds, not minutes). Fewer, fused kernels; the first "
                                      "steps and the first evaluation wait for the compiler.")
    max_grad_norm: float = _opt(0.0, "Clip the gradient norm to this value; 0 disables clipping.", minimum=0)
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
    text_length: int = _opt(77, "Token context length.", positive=True)
    vocab_size: int = _opt(49408, "Vocabulary size of the tokenizer (fixed by CLIP's BPE).")
    sampler: str = _opt("random", "Training sampler.", ("random", "identity"))
    num_instance: int = _opt(4, "Images per identity in a batch of the identity sampler (K of P x K).", positive=True)
    batch_size: int = _opt(64, "Training batch size; with several processes see batch_size_scope.", positive=True)
    test_batch_size: int = _opt(512, "Batch size when embedding the evaluation split.", positive=True)
    MLM: bool = _opt(False, "Kept for reference configs; MLM inputs are built when 'mlm' is in loss_names.")
    masked_token_rate: float = _opt(0.8, "Share of chosen MLM tokens replaced by <|mask|>.", minimum=0)
    masked_token_unchanged_rate: float = _opt(0.1, "Share of chosen MLM tokens left unchanged.", minimum=0)

    # --- model -------------------------------------------------------------------------------------------
    pretrain_choice: str = _opt("ViT-B/16", "Backbone weights: a file path; 'ViT-B/16' (OpenAI's ViT-B-16.pt, "
                                            "searched in pretrained_dir and ~/.cache/clip); or an architecture "
                                            "name for random weights ('ViT-B-16', 'ViT-Demo').")
    pretrained_dir: str = _opt("./pretrained", "Folder searched for OpenAI's CLIP files (ViT-B-16.pt).")
    stride_size: int = _opt(16, "Patch stride; must equal the patch size (kept for reference configs).", positive=True)
    temperature: float = _opt(0.02, "Contrastive temperature; logit scale = 1 / temperature (fixed).", positive=True)
    loss_names: str = _opt("sdm+itc+aux", "Losses joined by '+': " + ", ".join(LOSS_NAMES) + ".")
    sdm_loss_weight: float = _opt(1.0, "Weight of the SDM loss.", minimum=0)
    itc_loss_weight: Optional[float] = _opt(None, "Weight of the ITC loss; empty: 5 with a PHP head (the PHP "
                                                  "reference), 1 without.", minimum=0)
    cmpm_loss_weight: float = _opt(1.0, "Weight of the CMPM loss.", minimum=0)
    id_loss_weight: float = _opt(1.0, "Weight of the ID loss.", minimum=0)
    mlm_loss_weight: Optional[float] = _opt(None, "Weight of the MLM loss; empty: 0.5 with a PHP head (the PHP "
                                                  "reference), 1 without.", minimum=0)
    aux_factor: float = _opt(3.0, "Weight of the MoE load-balancing loss.", minimum=0)
    cmt_depth: int = _opt(4, "Layers of the IRRA cross-modal transformer (MLM head).", minimum=0)
    php_modules: str = _opt("crfm+efp", "PHP head modules.", PHP_MODULES)
    cnum: int = _opt(9, "Part tokens of the CRFM (K).", positive=True)
    num_experts: int = _opt(4, "Experts per EFP block.", positive=True)
    topk: int = _opt(2, "Experts each token is routed to.", positive=True)
    reduction: int = _opt(8, "Bottleneck reduction of each expert (D -> D / reduction).", positive=True)
    moe_layers: int = _opt(4, "EFP blocks.", positive=True)
    moe_heads: int = _opt(8, "Attention heads of each EFP block.", positive=True)
    efp_attention: str = _opt("tokens", "EFP self-attention: 'tokens' among a sample's part tokens (batch "
                                        "independent), or 'batch' across the batch as in the PHP reference "
                                        "release (embeddings depend on batch mates; for study only).",
                              ("tokens", "batch"))
    crfm_mask_padding: bool = _opt(True, "Exclude text padding from the CRFM softmax (the reference did not).")
    gate_context: str = _opt("shared", "EFP gate context vector shared by both modalities (reference) or one "
                                       "per modality.", ("shared", "per_modality"))

    # --- solver ------------------------------------------------------------------------------------------
    optimizer: str = _opt("Adam", "Optimizer.", ("Adam", "AdamW", "SGD"))
    lr: float = _opt(3e-6, "Base learning rate.", positive=True)
    bias_lr_factor: float = _opt(2.0, "Learning-rate factor of biases.", minimum=0)
    lr_factor: float = _opt(5.0, "Learning-rate factor of randomly initialised modules (cross-modal MLM "
                                 "modules, ID classifier, MLM head).", minimum=0)
    php_lr_factor: float = _opt(1.0, "Learning-rate factor of the PHP head (the reference trains it at 1).", minimum=0)
    moe_lr_factor: float = _opt(2.0, "Kept for reference configs; unused there and here (see php_lr_factor).")
    transformer_lr_factor: float = _opt(1.0, "Kept for reference configs; unused there and here.")
    momentum: float = _opt(0.9, "SGD momentum.", minimum=0)
    weight_decay: float = _opt(4e-5, "Weight decay.", minimum=0)
    weight_decay_bias: float = _opt(0.0, "Weight decay of biases.", minimum=0)
    alpha: float = _opt(0.9, "Adam/AdamW beta1.", minimum=0)
    beta: float = _opt(0.999, "Adam/AdamW beta2.", minimum=0)
    optimizer_eps: Optional[float] = _opt(None, "Adam/AdamW epsilon; empty: the reference's (Adam 1e-3, AdamW "
                                                "1e-8).", minimum=0)
    num_epoch: int = _opt(60, "Training epochs.", positive=True)
    lrscheduler: str = _opt("cosine", "Schedule after warm-up (formulas in solver/lr_scheduler.py): step, cosine, "
                                      "linear, and poly / exp as in the reference codebases; polynomial and "
                                      "exp_gamma are the textbook decays.",
                            ("step", "cosine", "poly", "exp", "linear", "polynomial", "exp_gamma"))
    milestones: List[int] = _opt([20, 50], "Epochs at which the step schedule multiplies the lr by gamma.")
    gamma: float = _opt(0.1, "Step-schedule factor (and exp_gamma's base).", minimum=0)
    warmup_factor: float = _opt(0.1, "Learning-rate factor at the start of warm-up.", minimum=0)
    warmup_epochs: int = _opt(5, "Warm-up epochs.", minimum=0)
    warmup_method: str = _opt("linear", "Warm-up shape.", ("constant", "linear", "exp"))
    target_lr: float = _opt(0.0, "Final learning rate of the cosine, poly and linear schedules.", minimum=0)
    power: float = _opt(0.9, "Base of the poly and exp schedules, exponent of polynomial.", minimum=0)

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
    """Safe loader that reads the reference's `!!python/tuple` tags as plain lists (nothing is executed) and
    refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"option {short_repr(key_node.value)} is given twice (first at line "
                                        f"{seen[key_node.value] + 1})", key_node.start_mark)
                    seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


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
        raise UserError(f"{path}: not valid YAML: {str(e)[:200]}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte offset {e.start}); expected a YAML config file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a config file (expected a flat mapping)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data is None:
        raise UserError(f"{path}: the config file is empty; expected a mapping of option names to values")
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
        got = "nothing (null)" if value is None else short_repr(value)
        raise UserError(f"{source}: option '{key}' expects {expected}, got {got}")

    if origin in (list, List):
        inner = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            fail("a list")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            fail(f"a list of {inner.__name__}")
        try:
            return [_scalar(inner, v) for v in value]
        except (TypeError, ValueError, OverflowError):
            fail(f"a list of {inner.__name__}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int,)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        fail("true or false")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail("an integer" if hint is int else "a number")
        try:
            return _scalar(hint, value)
        except (TypeError, ValueError, OverflowError):
            fail("an integer" if hint is int else "a finite number")
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            fail("a string")
        return str(value)
    return value


def _scalar(kind: type, value: Any) -> Any:
    """int or finite float from a YAML scalar or a command-line string; ValueError otherwise."""
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(value) if isinstance(value, int) else int(str(value).strip())
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_run_name(name: str, source: str) -> None:
    """A run's name is one folder name: it must not climb out of, or reach across, `output_dir`."""
    if (not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or name != name.strip()):
        raise UserError(f"{source}: option 'name' must be a plain folder name (no '/', not '.' or '..', no leading "
                        f"or trailing spaces); got {short_repr(name)}")


def validate(cfg: Config, source: str = "config") -> Config:
    """Check values that types alone do not constrain; raise UserError naming the key."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{source}: option '{name}' must be one of {', '.join(choices)}; got {short_repr(value)}")
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                continue
            if f.metadata.get("positive") and number <= 0:
                raise UserError(f"{source}: option '{name}' must be positive; got {number}")
            minimum = f.metadata.get("minimum")
            if minimum is not None and number < minimum:
                raise UserError(f"{source}: option '{name}' must be {minimum} or more; got {number}")
    check_run_name(cfg.name, source)
    if not DEVICE_PATTERN.match(cfg.device):
        raise UserError(f"{source}: option 'device' must be auto, cpu, cuda or cuda:N; got {short_repr(cfg.device)}")
    unknown = [n for n in cfg.losses if n not in LOSS_NAMES]
    if unknown or not cfg.losses:
        raise UserError(f"{source}: option 'loss_names' must join names from {', '.join(LOSS_NAMES)} with '+'; "
                        f"got {short_repr(cfg.loss_names)}")
    if len(cfg.img_size) != 2 or min(cfg.img_size) <= 0:
        raise UserError(f"{source}: option 'img_size' expects [height, width]; got {short_repr(cfg.img_size)}")
    if not 1 <= cfg.topk <= cfg.num_experts:
        raise UserError(f"{source}: option 'topk' must be between 1 and num_experts ({cfg.num_experts}); "
                        f"got {cfg.topk}")
    if "aux" in cfg.losses and "efp" not in cfg.php_modules:
        raise UserError(f"{source}: loss 'aux' needs the EFP (php_modules 'efp' or 'crfm+efp'); "
                        f"php_modules is {cfg.php_modules!r}")
    for key in ("alpha", "beta"):
        if getattr(cfg, key) >= 1:
            raise UserError(f"{source}: option '{key}' (an Adam beta) must be below 1; got {getattr(cfg, key)}")
    if cfg.sampler == "identity" and cfg.batch_size % cfg.num_instance:
        raise UserError(f"{source}: batch_size ({cfg.batch_size}) must be a multiple of num_instance "
                        f"({cfg.num_instance}) for the identity sampler")
    return cfg


# Options that may differ when a run is resumed: they change neither the model, the data nor the optimisation
# (how long it runs, how often it logs or evaluates, where and how fast it computes). Everything else must equal
# the run's configs.yaml; `name` and `output_dir` choose the run folder itself. Documented in the README.
RESUME_MUTABLE = ("num_epoch", "eval_period", "log_period", "num_workers", "device", "tensorboard",
                  "test_batch_size", "skip_nonfinite_steps", "torch_compile", "grad_checkpointing", "cache_images",
                  "root_dir", "pretrained_dir", "compat", "resume", "resume_ckpt_file", "overwrite")
_RUN_FOLDER_KEYS = ("name", "output_dir", "distributed", "world_size", "local_rank")


def resume_differences(requested: Config, saved: Config) -> List[str]:
    """The options, beyond RESUME_MUTABLE, in which `requested` differs from `saved`: 'key (saved -> requested)'."""
    differences = []
    for key in FIELDS:
        if key in RESUME_MUTABLE or key in _RUN_FOLDER_KEYS:
            continue
        old, new = getattr(saved, key), getattr(requested, key)
        if old != new:
            differences.append(f"{key} ({short_repr(old)} -> {short_repr(new)})")
    return differences


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
            name = key if isinstance(key, str) and len(key) <= 60 else short_repr(key)
            raise UserError(f"{source}: unknown option '{name}'{suggest(str(key))}")
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
    """Write the resolved config as plain YAML (no tags), atomically, creating its folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=True, default_flow_style=None), what="config")
