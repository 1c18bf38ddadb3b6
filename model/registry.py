"""The registries of heads and losses: plain dicts from name to spec, filled by decorators.

Every head and loss, the built-in ones included, registers here; a plug-in file (`custom_imports`, see
docs/extending.md) registers its own the same way, with no edit to the project:

    @register_loss("my_loss", weight=0.5, global_batch=True)
    def my_loss(out, cfg):                 # out: the tensors of one step (RetrievalModel.forward documents them)
        ...                                 # returns a scalar tensor, or {"loss": scalar, "name": diagnostic, ...}

    @register_head("my_head", lr_factor="my_head_lr_factor", options=[Option("my_head_lr_factor", float, 1.0, ...)])
    def build_my_head(cfg, ctx):           # ctx.dim, ctx.num_classes, ctx.vocab_size
        return MyHead(ctx.dim)              # a model.heads.Head; its parameters are named my_head.*

A head is built when the config asks for it (its `enabled(cfg)`; for a plug-in head: `heads: [my_head]`) or
when an active loss `needs` it. A loss's weight is a number (which becomes the option `<name>_loss_weight` with
that default), the name of an option, or a function of the config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from utils.plugins import declare
from utils.schema import Option

Weight = Union[float, str, Callable[[Any], float]]


@dataclass(frozen=True)
class HeadContext:
    """What a head's builder may need besides the config."""

    dim: int            # width of the joint embedding space
    num_classes: int    # training identities (0 when unknown, e.g. a model loaded for testing)
    vocab_size: int     # the tokenizer's vocabulary


@dataclass(frozen=True)
class HeadSpec:
    name: str
    build: Callable[[Any, HeadContext], Any]
    enabled: Callable[[Any], bool]
    # How the optimizer treats the head's parameters (solver/optimizer.py): `lr_groups` maps a kind ("factor": lr *
    # lr_factor unless a bias; "head_factor": lr * lr_factor, bias decay for biases) to the head's submodules of
    # that kind, by attribute path ("" = the whole head); a parameter of no listed submodule is "base" (lr, bias
    # rule). `lr_factor` (an option, or a number) multiplies the result; None: the head declared no learning-rate
    # group, and its parameters train at the base lr with a warning.
    lr_groups: Dict[str, Tuple[str, ...]]
    lr_factor: Union[str, float, None]
    owner: str
    # The learning-rate factor of the head's biases (an option or a number), instead of bias_lr_factor: a head may
    # train its biases like its weights (1.0). None: bias_lr_factor.
    bias_lr_factor: Union[str, float, None] = None
    # Where the head's parameters come in the model, and so in a saved optimizer state: heads are ordered by it,
    # then by name, never by the order their modules happen to be imported in.
    order: int = 100
    # Default weights of other losses while this head is built: a loss whose weight option is empty takes it
    # (a method's reference weights, e.g. {"itc": 5.0}); else 1.
    loss_weights: Dict[str, float] = field(default_factory=dict)
    # The options its weights imply, read from a state dict in this project's names (`<name>.*`) and the
    # embedding width: how a checkpoint is rebuilt without the data set or the config's word for it.
    sizes: Optional[Callable[[Dict[str, Any], int], Dict[str, Any]]] = None

    def lr_kind(self, param: str) -> str:
        """The kind of the head's parameter `param` (its name within the head): the kind of the submodule it
        belongs to, else 'base'."""
        for kind, modules in self.lr_groups.items():
            if any(not m or param == m or param.startswith(m + ".") for m in modules):
                return kind
        return "base"


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[Dict[str, Any], Any], Any]
    weight: Weight
    global_batch: bool  # computed over the features of every process under DDP (gather_features)
    needs: Tuple[str, ...]  # heads that must exist for it
    check: Optional[Callable[[Any], Optional[str]]]  # a config it cannot work with -> the reason
    owner: str
    gathers: Tuple[str, ...] = ()  # keys of `out` gathered over processes too, with global_batch
    # Extra image views of each training item it needs (datasets/transforms.py VIEWS; they reach the model as
    # batch["view_<name>"]). Only the views some active loss asks for are made.
    views: Union[Tuple[str, ...], Callable[[Any], Sequence[str]]] = ()


HEADS: Dict[str, HeadSpec] = {}
LOSSES: Dict[str, LossSpec] = {}


def register_head(name: str, *, enabled: Optional[Callable[[Any], bool]] = None, lr_factor: Union[str, float,
                  None] = None, lr_groups: Optional[Dict[str, Sequence[str]]] = None,
                  bias_lr_factor: Union[str, float, None] = None, options: Sequence[Option] = (), order: int = 100,
                  loss_weights: Optional[Dict[str, float]] = None,
                  sizes: Optional[Callable[[Dict[str, Any], int], Dict[str, Any]]] = None):
    """Decorator for `build(cfg, ctx) -> Head`. Without `enabled`, the head is built when `cfg.heads` lists it.
    Declaring `lr_factor` (an option name or a number; 1.0 for the base lr) gives it a learning-rate group;
    `lr_groups` ({"factor" | "head_factor": [submodule, ...]}) sets the kind of its submodules (see HeadSpec);
    `bias_lr_factor` (an option name or a number) the factor of its biases instead of the run's bias_lr_factor;
    `order`, `loss_weights` and `sizes` as HeadSpec says."""
    def decorator(build):
        owner = declare(HEADS, "head", name, build.__module__, options)
        groups = {kind: tuple(modules) for kind, modules in (lr_groups or {}).items()}
        unknown = set(groups) - {"factor", "head_factor"}
        if unknown:
            raise ValueError(f"head {name!r}: lr_groups kinds must be 'factor' or 'head_factor', got {sorted(unknown)}")
        HEADS[name] = HeadSpec(name, build, enabled or (lambda cfg: name in cfg.heads), groups, lr_factor, owner,
                               bias_lr_factor, order, dict(loss_weights or {}), sizes)
        return build
    return decorator


def register_loss(name: str, *, weight: Weight = 1.0, global_batch: bool = False, needs: Sequence[str] = (),
                  check: Optional[Callable[[Any], Optional[str]]] = None, options: Sequence[Option] = (),
                  gathers: Sequence[str] = (), views: Union[Sequence[str], Callable[[Any], Sequence[str]]] = ()):
    """Decorator for `fn(out, cfg) -> scalar tensor or {"loss": scalar, ...}`; see the module docstring.
    `gathers`: more keys of `out` that a `global_batch` loss sees over every process; `views`: the extra image
    views of each item it needs (names of datasets/transforms.VIEWS), or a function of the config giving them."""
    def decorator(fn):
        declared = list(options)
        weight_of: Weight = weight
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            if any(o.name == f"{name}_loss_weight" for o in declared):
                raise ValueError(f"loss {name!r} declares its weight twice: weight={weight} makes the option "
                                 f"{name}_loss_weight, which its options declare too; give one of them (weight= the "
                                 f"option's name uses the declared option)")
            declared.append(Option(f"{name}_loss_weight", float, float(weight), f"Weight of the {name} loss.",
                                   minimum=0))
            weight_of = f"{name}_loss_weight"
        owner = declare(LOSSES, "loss", name, fn.__module__, declared)
        LOSSES[name] = LossSpec(name, fn, weight_of, global_batch, tuple(needs), check, owner, tuple(gathers),
                                views if callable(views) else tuple(views))
        return fn
    return decorator


def loss_views(cfg) -> Tuple[str, ...]:
    """The extra image views the active losses of `cfg` need, in first-asked order."""
    views: Dict[str, None] = {}
    for name in cfg.losses:
        spec = LOSSES.get(name)
        if spec is not None:
            views.update(dict.fromkeys(spec.views(cfg) if callable(spec.views) else spec.views))
    return tuple(views)


def ordered_losses(names) -> list:
    """Loss names in the order the model computes (and the trainer sums) them: the shared losses, then each built-in
    method's by package name, then plug-ins', each in the order they were registered. Not the order their modules
    happen to be imported in, which would change the sum's last bits."""
    registered = list(LOSSES)

    def rank(name: str):
        owner = LOSSES[name].owner
        group = owner.split(".")[1] if owner.startswith("methods.") else ("" if owner.startswith("model.") else None)
        return (0, group, registered.index(name)) if group is not None else (1, "", registered.index(name))
    return sorted(names, key=rank)


def ordered_heads(names) -> list:
    """Head names in the order their parameters take in a model (HeadSpec.order, then name)."""
    return sorted(names, key=lambda name: (HEADS[name].order, name))


def loss_weight(spec: LossSpec, cfg, heads: Sequence[str] = ()) -> float:
    """The loss's weight in a model with `heads`: its option's value; an empty one takes the first of those heads'
    declared default (HeadSpec.loss_weights), else 1."""
    if callable(spec.weight):
        return float(spec.weight(cfg))
    if isinstance(spec.weight, str):
        value = getattr(cfg, spec.weight)
        if value is None:
            declared = [HEADS[h].loss_weights[spec.name] for h in ordered_heads(heads)
                        if spec.name in HEADS[h].loss_weights]
            return float(declared[0]) if declared else 1.0
        return float(value)
    return float(spec.weight)
