"""The run configuration's schema: every option with its type, default, allowed values, bounds and help text.

A run is described by a flat mapping from option name to value. The names are those of the command line and of
the reference codebases, so their `configs.yaml` files and commands carry over. The options every run has are the
fields of `Config` below; a method (methods/<name>/) or a plug-in (docs/extending.md) declares its own where it
registers its heads and losses, and they behave the same: typed, validated, listed by `--help`, written to
configs.yaml. Reading and resolving a configuration is utils/config.py.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from utils.errors import short_repr



@dataclass(frozen=True)
class Option:
    """One option: `type` is a typing hint (int, float, str, bool, Optional[float], List[int], ...)."""

    name: str
    type: Any
    default: Any
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    minimum: Optional[float] = None
    positive: bool = False
    maximum: Optional[float] = None
    owner: str = "core"  # the plug-in that declared it
    aliases: Optional[Dict[str, Any]] = None  # values of earlier versions (as written in YAML) -> today's
    path: bool = False  # names a file or folder: a run records it as an absolute path


def _opt(default, help: str, choices: Iterable | None = None, minimum: float | None = None,
         positive: bool = False, aliases: Optional[Dict[str, Any]] = None, path: bool = False,
         maximum: float | None = None):
    """A schema field: its default, help text, allowed values, lower bound (`minimum`, or > 0 if `positive`),
    `aliases`, the values an earlier version wrote (keys as lower-case strings) with what they mean now, and
    whether it names a file or folder (`path`)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum, "positive": positive,
            "aliases": aliases, "path": path, "maximum": maximum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- the run -----------------------------------------------------------------------------------------
    name: str = _opt("run", "Run name; the run lives in <output_dir>/<dataset_name>/<name>/.")
    custom_imports: List[str] = _opt([], "Python files (or module names) of plug-ins, imported before anything is "
                                         "built: heads, losses, data sets and their options (docs/extending.md).")
    output_dir: str = _opt("logs", "Folder that holds all runs.")
    dataset_name: str = _opt("CUHK-PEDES", "Data set, by registered name: CUHK-PEDES, ICFG-PEDES, RSTPReid, "
                                           "Demo-PEDES, custom (your own annotation_file), or a plug-in's.")
    annotation_file: str = _opt("", "dataset_name custom: a JSON list or a CSV of image path, person id, caption "
                                    "and split (docs/extending.md); image paths relative to the file's folder.",
                                path=True)
    root_dir: str = _opt("./data", "Folder that holds the data set folders (<root_dir>/<dataset_name>/).", path=True)
    # The samplers and the noise draw use seed % 2**63.
    seed: int = _opt(1, "Seed of every random number generator (model init, samplers, augmentation, masking).",
                     minimum=0, maximum=2 ** 63 - 1)
    device: str = _opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    precision: str = _opt("fp32", "Autocast precision; master weights stay fp32. 'auto': on CUDA bf16 where the "
                                  "GPU supports it, else fp16; on the CPU the faster of fp32 and bf16, timed on the "
                                  "run's model before it trains (processor/precision.py); the run records its "
                                  "choice.", ("fp32", "bf16", "fp16", "auto"))
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
    resume_ckpt_file: str = _opt("", "Checkpoint to resume from instead of <run>/last.pth.", path=True)
    overwrite: bool = _opt(False, "Start afresh in a run folder that already holds checkpoints, replacing them "
                                  "(without it, such a start is refused).")
    allow_changed_plugins: bool = _opt(False, "Resume a run although a custom_imports file changed since it was "
                                              "trained (without it, such a resume is refused).")
    tensorboard: bool = _opt(True, "Write TensorBoard scalars to <run>/tensorboard.")
    skip_nonfinite_steps: int = _opt(0, "Tolerate up to this many steps with a non-finite loss (skipped) "
                                        "before stopping the run.", minimum=0)
    grad_checkpointing: bool = _opt(False, "Recompute backbone activations in backward to save memory.")
    torch_compile: str = _opt("none", "torch.compile for training: 'blocks' compiles each transformer block of the "
                                      "backbone in place (regional: seconds, not minutes; fewer, fused kernels); "
                                      "'full' the whole training forward and backward, as CUDA graphs on a GPU "
                                      "(mode reduce-overhead: the step's thousands of kernel launches replayed "
                                      "at once), fused kernels on the CPU; evaluation runs uncompiled.",
                              ("none", "blocks", "full"), aliases={"true": "blocks", "false": "none"})
    max_grad_norm: float = _opt(0.0, "Clip the gradient norm to this value; 0 disables clipping.", minimum=0)
    gather_features: bool = _opt(True, "With several processes, the batch-level losses (itc, sdm, cmpm, the "
                                       "MoE balancing loss) see the global batch, gathered from every process, "
                                       "as in a single-process run on it; off: each process's own share.")
    batch_size_scope: str = _opt("global", "'global': batch_size is the batch of one optimizer step, split evenly "
                                           "over the processes (so it must divide by their number), and a config "
                                           "means the same at any process count; 'per_process': every process "
                                           "takes batch_size, the global batch is batch_size x processes.",
                                 ("global", "per_process"))

    # --- data --------------------------------------------------------------------------------------------
    img_size: List[int] = _opt([384, 128], "Image height and width.")
    img_aug: bool = _opt(True, "Training augmentation of the image recipe; off: what the recipe keeps (clip: the "
                                "flip).")
    image_recipe: str = _opt("clip", "Image transforms, by registered name (datasets/transforms.py): 'clip' (CLIP "
                                     "normalisation; training: flip, pad-and-crop, erasing), or a method's.")
    cache_images: bool = _opt(False, "Decode and resize every training image once, before training, and keep "
                                     "it in memory (H*W*3 bytes each: 147 KB at 384x128, ~5 GB for "
                                     "CUHK-PEDES); augmentation still runs per item. For when decoding limits "
                                     "the step, as on a 2-core CPU.")
    text_length: int = _opt(77, "Token context length.", positive=True)
    caption_augment: str = _opt("none", "Augmentation of the training captions, by registered name: none, or a "
                                        "method's or plug-in's (datasets/augment.py).")
    noisy_rate: float = _opt(0.0, "Noisy correspondence (SPEC 12): give this share of the training pairs each "
                                  "other's captions (a seeded permutation among them); 0 keeps the data as it is.",
                             minimum=0)
    noisy_file: str = _opt("", "A permutation of the training pairs to apply instead (RDE's noiseindex/<data "
                               "set>_<rate>.npy, over the pairs in annotation order); empty: drawn from seed and "
                               "noisy_rate.", path=True)
    sampler: str = _opt("random", "Training sampler.", ("random", "identity"))
    num_instance: int = _opt(4, "Images per identity in a batch of the identity sampler (K of P x K).", positive=True)
    batch_size: int = _opt(64, "Training batch size; with several processes see batch_size_scope.", positive=True)
    test_batch_size: int = _opt(512, "Batch size when embedding the evaluation split.", positive=True)

    # --- model -------------------------------------------------------------------------------------------
    pretrain_choice: str = _opt("ViT-B/16", "Backbone weights: a file path (CLIP weights, or a run's best.pth "
                                            "or last.pth, whose backbone is taken); 'ViT-B/16' (OpenAI's "
                                            "ViT-B-16.pt, searched in pretrained_dir and ~/.cache/clip); or an "
                                            "architecture name for random weights ('ViT-B-16', 'ViT-Demo').")
    pretrained_dir: str = _opt("./pretrained", "Folder searched for OpenAI's CLIP files (ViT-B-16.pt).", path=True)
    stride_size: int = _opt(16, "Patch stride; must equal the patch size (kept for reference configs).", positive=True)
    temperature: float = _opt(0.02, "Contrastive temperature; logit scale = 1 / temperature (fixed unless a head "
                                    "learns its own, as TBPS-CLIP's does).", positive=True)
    text_attn_dropout: float = _opt(0.0, "Dropout on the attention probabilities of the text tower's blocks "
                                         "(TBPS-CLIP: 0.05).", minimum=0)
    freeze_patch_embed: bool = _opt(False, "Keep the image tower's patch embedding (conv1) frozen, as TBPS-CLIP "
                                           "does.")
    loss_names: str = _opt("sdm", "Losses joined by '+', by registered name: itc, sdm, cmpm, or a method's or "
                                  "plug-in's.")
    sdm_loss_weight: float = _opt(1.0, "Weight of the SDM loss.", minimum=0)
    itc_loss_weight: Optional[float] = _opt(None, "Weight of the ITC loss; empty: the default of an active head "
                                                  "(the PHP head's 5), else 1.", minimum=0)
    cmpm_loss_weight: float = _opt(1.0, "Weight of the CMPM loss.", minimum=0)
    heads: List[str] = _opt([], "Plug-in heads to add, by registered name (the methods' heads follow their own "
                                "options and loss_names).")
    callbacks: List[str] = _opt([], "Plug-in per-epoch callbacks to run, by registered name (processor/callbacks.py; "
                                    "the built-in ones follow loss_names).")

    # --- solver ------------------------------------------------------------------------------------------
    optimizer: str = _opt("Adam", "Optimizer.", ("Adam", "AdamW", "SGD"))
    lr: float = _opt(3e-6, "Base learning rate.", positive=True)
    bias_lr_factor: float = _opt(2.0, "Learning-rate factor of biases.", minimum=0)
    lr_factor: float = _opt(5.0, "Learning-rate factor of randomly initialised modules (cross-modal MLM "
                                 "modules, ID classifier, MLM head).", minimum=0)
    momentum: float = _opt(0.9, "SGD momentum.", minimum=0)
    weight_decay: float = _opt(4e-5, "Weight decay.", minimum=0)
    weight_decay_bias: float = _opt(0.0, "Weight decay of biases.", minimum=0)
    no_decay_1d: bool = _opt(False, "No weight decay for any parameter of fewer than 2 dimensions (norms, "
                                    "embeddings' class token, a learned logit scale), biases included, as "
                                    "TBPS-CLIP groups them.")
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
    lr_step: str = _opt("epoch", "When the schedule advances: once an epoch (IRRA, PHP), or after every "
                                 "iteration ('iteration', TBPS-CLIP: warm-up and decay per step).",
                        ("epoch", "iteration"))
    target_lr: float = _opt(0.0, "Final learning rate of the cosine, linear, poly and polynomial schedules.",
                            minimum=0)
    power: float = _opt(0.9, "Base of the poly and exp schedules, exponent of polynomial.", minimum=0)

    # --- derived helpers ---------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        object.__setattr__(self, "_plugin_values", {})

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: a plug-in option this config was given, or an option of a
        # built-in component (RDE's, ...), which every config has.
        values = self.__dict__.get("_plugin_values", {})
        if name in values:
            return values[name]
        if name in BUILTIN_OPTIONS:
            values[name] = copy.deepcopy(PLUGIN_OPTIONS[name].default)
            return values[name]
        raise AttributeError(f"config has no option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PLUGIN_OPTIONS and name not in CORE:
            self.__dict__["_plugin_values"][name] = value
        else:
            object.__setattr__(self, name, value)

    def enable_plugin_options(self, names: Iterable[str]) -> None:
        """Give this config the plug-in options `names`, at their defaults unless already set."""
        for name in names:
            self.__dict__["_plugin_values"].setdefault(name, copy.deepcopy(PLUGIN_OPTIONS[name].default))

    @property
    def plugin_options(self) -> List[str]:
        """The options beyond the schema's fields that this config has: those of the built-in components (heads,
        losses, callbacks registered by the project itself), then those of its custom_imports."""
        own = self.__dict__["_plugin_values"]
        return [*BUILTIN_OPTIONS, *(name for name in own if name not in BUILTIN_OPTIONS)]

    @property
    def losses(self) -> List[str]:
        return [n for n in self.loss_names.split("+") if n]

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.dataset_name, self.name)

    def to_dict(self, leave_out: Iterable[str] = ()) -> Dict[str, Any]:
        """Every option and its value, but those of `leave_out` (the options of components a run does not use)."""
        skip = set(leave_out)
        return {name: copy.deepcopy(getattr(self, name)) for name in [*CORE, *self.plugin_options]
                if name not in skip}

    def copy(self, **changes: Any) -> "Config":
        """A copy with `changes` applied (plug-in options included; dataclasses.replace would drop them)."""
        other = copy.deepcopy(self)
        for name, value in changes.items():
            setattr(other, name, value)
        return other


_HINTS = typing.get_type_hints(Config)
CORE: Dict[str, Option] = {
    f.name: Option(f.name, _HINTS[f.name], f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default, f.metadata["help"], f.metadata["choices"], f.metadata["minimum"],
                   f.metadata["positive"], aliases=f.metadata["aliases"], path=f.metadata["path"],
                   maximum=f.metadata["maximum"])
    for f in dataclasses.fields(Config)}
PLUGIN_OPTIONS: Dict[str, Option] = {}
# The options that the project's own components declare through the registries (as plug-ins do): every config
# has them; a run's configs.yaml holds those of the components it uses.
BUILTIN_OPTIONS: List[str] = []

# Options of earlier versions and of the reference codebases that mean nothing here. A config file that holds
# them (a published run's, or one this project wrote before they were retired) is read without them, and the
# reader says which were dropped; on the command line they are unknown options.
RETIRED = {
    "training": "always true",
    "vocab_size": "fixed by CLIP's BPE (the checkpoint gives it)",
    "MLM": "MLM inputs follow loss_names",
    "moe_lr_factor": "unused by the PHP reference too (php_lr_factor is the PHP head's)",
    "transformer_lr_factor": "unused by the PHP reference too",
    "distributed": "set by torchrun",
    "world_size": "set by torchrun (recorded in the checkpoint)",
    "local_rank": "set by torchrun",
    "compat": "how a run is loaded, not how it was trained: --compat of test.py, retrieve.py and sh run.sh test/serve",
    "txt_aug": "RDE's caption augmentation is caption_augment: rde",
}


def value_fits(hint: Any, value: Any) -> bool:
    """Whether `value` is of the option type `hint` (int, float, str, bool, Optional[...], List[...]) as a config
    holds it (an int is a float; a bool is no number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(value_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, List):
        return isinstance(value, list) and all(value_fits(args[0], v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def type_name(hint: Any) -> str:
    """An option type as the help says it: 'float', 'list of int', 'float or empty'."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, List):
        return f"list of {type_name(args[0])}"
    if typing.get_origin(hint) is typing.Union:
        return f"{type_name(args[0])} or empty"
    return getattr(hint, "__name__", str(hint))


def option(name: str) -> Optional[Option]:
    """The option called `name` (this project's or a plug-in's), None if there is none."""
    return CORE.get(name) or PLUGIN_OPTIONS.get(name)


def _same_option(a: Option, b: Option) -> bool:
    """Whether two declarations mean the same option (its help text aside)."""
    fields = ("type", "default", "minimum", "maximum", "positive", "aliases", "path")
    return all(getattr(a, f) == getattr(b, f) for f in fields) and tuple(a.choices or ()) == tuple(b.choices or ())


def register_options(options: Sequence[Option], owner: str, builtin: bool = False) -> List[str]:
    """Add a plug-in's options (or, `builtin`, a built-in component's) to the schema; returns their names. A name
    taken by this project, or by another plug-in with another meaning, is a ValueError (a programming error in the
    plug-in, reported when it is imported); the same declaration again shares the option."""
    names = []
    for opt in options:
        taken = CORE.get(opt.name) or PLUGIN_OPTIONS.get(opt.name)
        if taken is not None and opt.name not in CORE and taken.owner != owner and _same_option(taken, opt):
            names.append(opt.name)  # declared again as it is (a copy of a method): one option, the first owner's
            continue
        if opt.name in CORE or (taken is not None and taken.owner != owner):
            raise ValueError(f"option {opt.name!r} of {owner} is already declared by "
                             f"{'this project' if opt.name in CORE else taken.owner}")
        if not opt.name.isidentifier():
            raise ValueError(f"option name {short_repr(opt.name)} of {owner} is not a Python identifier")
        if not value_fits(opt.type, opt.default):
            raise ValueError(f"option {opt.name!r} of {owner} declares the type {getattr(opt.type, '__name__', opt.type)} "
                             f"but its default {short_repr(opt.default)} is not one")
        PLUGIN_OPTIONS[opt.name] = dataclasses.replace(opt, owner=owner,
                                                       choices=tuple(opt.choices) if opt.choices else None)
        if builtin and opt.name not in BUILTIN_OPTIONS:
            BUILTIN_OPTIONS.append(opt.name)
        names.append(opt.name)
    return names


# Options that may differ when a run is resumed: they change neither the model, the data nor the optimisation
# (how long it runs, how often it logs or evaluates, where and how fast it computes). Everything else must equal
# the run's configs.yaml; `name` and `output_dir` choose the run folder itself. Documented in docs/reliability.md.
RESUME_MUTABLE = ("num_epoch", "eval_period", "log_period", "num_workers", "device", "tensorboard",
                  "test_batch_size", "skip_nonfinite_steps", "torch_compile", "grad_checkpointing", "cache_images",
                  "root_dir", "pretrained_dir", "resume", "resume_ckpt_file", "overwrite",
                  "allow_changed_plugins")
_RUN_FOLDER_KEYS = ("name", "output_dir")
# Requested values that a run resolves when it starts and records resolved: resuming with them matches whatever
# the run recorded (it keeps its choice: processor/precision.py).
RESOLVED_AT_START = {"precision": "auto"}


def resume_differences(requested: Config, saved: Config) -> List[str]:
    """The options, beyond RESUME_MUTABLE, in which `requested` differs from `saved`: 'key (saved -> requested)'."""
    differences = []
    for key in [*CORE, *sorted(set(requested.plugin_options) | set(saved.plugin_options))]:
        if key in RESUME_MUTABLE or key in _RUN_FOLDER_KEYS:
            continue
        old, new = getattr(saved, key, None), getattr(requested, key, None)
        if old != new and not (key in RESOLVED_AT_START and new == RESOLVED_AT_START[key]):
            differences.append(f"{key} ({short_repr(old)} -> {short_repr(new)})")
    return differences
