"""Caption augmentations of the training data path, by registered name (the option `caption_augment`), and the
token inputs a loss may need beside the caption (`register_token_inputs`: masked-language-model inputs, say).

An augmentation works on one of two stages: on the caption's text before tokenisation (`stage="text"`:
`fn(caption, alternatives) -> caption`, `alternatives` the annotation's other texts of that caption, e.g.
`captions_bt`, its back-translation, when the file has them), or on its token ids (`stage="tokens"`: ids [L],
SOT ... EOT, zero padding, into others of the same length). It runs inside the item's forked, seeded RNG
(datasets/image_text.py), so it draws from torch's global generator and stays a function of (seed, epoch, index):
any number of workers and a resumed run give the same tokens. A plug-in registers its own:

    @register_caption_augment("my_aug")
    def my_aug(ids: torch.Tensor) -> torch.Tensor:
        ...

Token inputs are a token-stage augmentation that adds to the item instead of replacing the caption: the factory
registered gets the config and returns `fn(ids [L]) -> {key: tensor}`, which runs on every training caption
(after its augmentation, in the same seeded RNG) while `enabled(cfg)`; the keys reach the model in the batch.
A factory's result must pickle (a module-level function, or functools.partial of one), for worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from utils.errors import UserError, did_you_mean, short_repr
from utils.plugins import declare
from utils.schema import Option

TokenAugment = Callable[[torch.Tensor], torch.Tensor]
TextAugment = Callable[[str, Mapping[str, str]], str]
STAGES = ("tokens", "text")


@dataclass(frozen=True)
class AugmentSpec:
    name: str
    fn: Optional[Callable]
    owner: str
    stage: str = "tokens"


CAPTION_AUGMENTS: Dict[str, AugmentSpec] = {}


def register_caption_augment(name: str, *, stage: str = "tokens", options: Sequence[Option] = ()):
    """Decorator for `fn(ids [L]) -> ids [L]` (stage 'tokens') or `fn(caption, alternatives) -> caption` (stage
    'text'); see the module docstring."""
    if stage not in STAGES:
        raise ValueError(f"caption augmentation {name!r}: stage must be one of {STAGES}, got {stage!r}")

    def decorator(fn):
        CAPTION_AUGMENTS[name] = AugmentSpec(name, fn, declare(CAPTION_AUGMENTS, "caption augmentation", name,
                                                               fn.__module__, options), stage)
        return fn
    return decorator


CAPTION_AUGMENTS["none"] = AugmentSpec("none", None, __name__)


def caption_augment(name: str) -> Tuple[Optional[TextAugment], Optional[TokenAugment]]:
    """(text-stage function, token-stage function) of a registered augmentation, None for the stage it does not
    work on (both for 'none'); an unknown name is one line."""
    spec = CAPTION_AUGMENTS.get(name)
    if spec is None:
        raise UserError(f"config: unknown caption_augment {short_repr(name)}{did_you_mean(name, CAPTION_AUGMENTS)} "
                        f"(registered: {', '.join(CAPTION_AUGMENTS)}; a plug-in's own must be listed in "
                        f"custom_imports)")
    return (spec.fn, None) if spec.stage == "text" else (None, spec.fn)


@dataclass(frozen=True)
class TokenInputsSpec:
    name: str
    factory: Callable[[Any], Callable[[torch.Tensor], Dict[str, torch.Tensor]]]
    enabled: Callable[[Any], bool]
    owner: str


TOKEN_INPUTS: Dict[str, TokenInputsSpec] = {}


def register_token_inputs(name: str, *, enabled: Callable[[Any], bool], options: Sequence[Option] = ()):
    """Decorator for `factory(cfg) -> fn(ids [L]) -> {key: tensor}` (see the module docstring)."""
    def decorator(factory):
        TOKEN_INPUTS[name] = TokenInputsSpec(name, factory, enabled, declare(TOKEN_INPUTS, "token inputs", name,
                                                                             factory.__module__, options))
        return factory
    return decorator


def token_inputs(cfg) -> List[Callable[[torch.Tensor], Dict[str, torch.Tensor]]]:
    """The token-input functions `cfg` enables, in registration order."""
    return [spec.factory(cfg) for spec in TOKEN_INPUTS.values() if spec.enabled(cfg)]
