"""Reading and resolving a run's configuration (the options themselves are in utils/schema.py).

Values come from, in order: the schema's defaults, a YAML file (`--config_file`), then `--key value` pairs on the
command line. Before any value is applied, the plug-ins that `custom_imports` names are imported
(utils/plugins.py), so that their options are known. An unknown key anywhere is an error that suggests the
nearest valid name. YAML is always read with a safe loader; the reference's `!!python/tuple` tags are read as
lists. Options retired from the schema (utils.schema.RETIRED) are dropped from files with a note.
"""
from __future__ import annotations

import logging
import math
import os
import re
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from utils.errors import UserError, did_you_mean, short_repr
from utils.files import reading, write_atomic
from utils.plugins import import_plugins
from utils.schema import CORE, PLUGIN_OPTIONS, RETIRED, Config, Option, option  # noqa: F401 - re-exported

logger = logging.getLogger("php")


def option_names() -> List[str]:
    return [*CORE, *PLUGIN_OPTIONS]


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
        with reading(path, "YAML"), open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f, Loader=_TupleSafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e)[:200]}") from None
    if data is None:
        raise UserError(f"{path}: the config file is empty; expected a mapping of option names to values")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def drop_retired(values: Dict[str, Any], source: str) -> Tuple[Dict[str, Any], List[str]]:
    """`values` without the options utils.schema.RETIRED lists, and the names dropped (noted in the log)."""
    dropped = [k for k in values if k in RETIRED]
    if dropped:
        logger.info("%s: ignoring option(s) that mean nothing here: %s", source,
                    "; ".join(f"{k} ({RETIRED[k]})" for k in dropped))
    return {k: v for k, v in values.items() if k not in RETIRED}, dropped


def _coerce(opt: Option, value: Any, source: str) -> Any:
    """Convert a value (from YAML or a command-line string) to the type the schema declares for `opt`."""
    key, hint = opt.name, opt.type
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
        value = str(value)
        return (opt.aliases or {}).get(value.lower(), value)
    return value


def _scalar(kind: type, value: Any) -> Any:
    """str, int or finite float from a YAML scalar or a command-line string; ValueError otherwise."""
    if kind is str:
        return str(value)
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


def _check_option(opt: Option, value: Any, source: str) -> None:
    if opt.choices and value not in opt.choices:
        raise UserError(f"{source}: option '{opt.name}' must be one of {', '.join(map(str, opt.choices))}; got "
                        f"{short_repr(value)}")
    for number in value if isinstance(value, list) else [value]:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if opt.positive and number <= 0:
            raise UserError(f"{source}: option '{opt.name}' must be positive; got {number}")
        if opt.minimum is not None and number < opt.minimum:
            raise UserError(f"{source}: option '{opt.name}' must be {opt.minimum} or more; got {number}")
        if opt.maximum is not None and number > opt.maximum:
            raise UserError(f"{source}: option '{opt.name}' must be {opt.maximum} or less; got {number}")


def _rule_loss_names(get, source):
    if not [n for n in str(get("loss_names")).split("+") if n]:
        raise UserError(f"{source}: option 'loss_names' must name at least one loss; got {short_repr(get('loss_names'))}")


def _rule_img_size(get, source):
    size = get("img_size")
    if len(size) != 2 or min(size) <= 0:
        raise UserError(f"{source}: option 'img_size' expects [height, width]; got {short_repr(size)}")


def _rule_betas(get, source):
    for key in ("alpha", "beta"):
        if get(key) >= 1:
            raise UserError(f"{source}: option '{key}' (an Adam beta) must be below 1; got {get(key)}")


def _rule_identity_batch(get, source):
    if get("sampler") == "identity" and get("batch_size") % get("num_instance"):
        raise UserError(f"{source}: batch_size ({get('batch_size')}) must be a multiple of num_instance "
                        f"({get('num_instance')}) for the identity sampler")


def _rule_warmup(get, source):
    if get("lrscheduler") != "step" and get("warmup_epochs") >= get("num_epoch"):
        raise UserError(f"{source}: option 'warmup_epochs' ({get('warmup_epochs')}) must be smaller than "
                        f"num_epoch ({get('num_epoch')}) for the {get('lrscheduler')} schedule")


def _rule_milestones(get, source):
    milestones = list(get("milestones"))
    if milestones != sorted(milestones):
        raise UserError(f"{source}: option 'milestones' must be in increasing order; got {milestones}")


def _rule_noisy_rate(get, source):
    if get("noisy_rate") >= 1:
        raise UserError(f"{source}: option 'noisy_rate' is the share of training pairs made noisy: below 1; got "
                        f"{get('noisy_rate')}")


# Checks that involve several options: each applies to a set of values that holds all of its keys. A method adds
# those of its own options with register_rule.
RULES = [
    (("loss_names",), _rule_loss_names), (("img_size",), _rule_img_size),
    (("alpha", "beta"), _rule_betas), (("sampler", "batch_size", "num_instance"), _rule_identity_batch),
    (("lrscheduler", "warmup_epochs", "num_epoch"), _rule_warmup), (("milestones",), _rule_milestones),
    (("noisy_rate",), _rule_noisy_rate),
]


def register_rule(keys: Sequence[str], rule: Callable[[Callable[[str], Any], str], None]) -> None:
    """A check of several options: `rule(get, source)` raises a UserError naming `source` when the values that
    `get(name)` gives (all of `keys`) do not go together."""
    RULES.append((tuple(keys), rule))


def check_options(values: Dict[str, Any], source: str = "config",
                  origins: Optional[Dict[str, str]] = None) -> None:
    """The schema's checks of `values` (option name -> value, all of a config or a part of it): each option's
    choices and bounds, then every rule whose options are all present. The one place options are validated;
    modules that take options from elsewhere (a checkpoint, a mapping) call it for theirs. An error names where
    the values at fault came from: `origins` (option -> its source, such as "command line"), else `source`."""
    origins = origins or {}
    for name, value in values.items():
        opt = option(name)
        if opt is not None:
            _check_option(opt, value, origins.get(name, source))
    for keys, rule in RULES:
        if all(k in values for k in keys):
            rule(values.__getitem__, _source_of(keys, origins, source))


def _source_of(keys: Sequence[str], origins: Dict[str, str], source: str) -> str:
    """Where the values of `keys` came from, for a rule that relates them: each distinct origin among those given
    explicitly (a file, the command line), else `source` (the defaults)."""
    found = list(dict.fromkeys(origins[k] for k in keys if k in origins))
    return " and ".join(found) if found else source


def validate(cfg: Config, source: str = "config", origins: Optional[Dict[str, str]] = None) -> Config:
    """Check values that types alone do not constrain; raise UserError naming the key and where its value came
    from (`origins`, option -> source, else `source`). (Names of heads, losses and data sets are checked by their
    registries, when the model and the data set are built.)"""
    origins = origins or {}
    check_options({name: getattr(cfg, name) for name in [*CORE, *cfg.plugin_options]}, source, origins)
    check_run_name(cfg.name, origins.get("name", source))
    if not DEVICE_PATTERN.match(cfg.device):
        raise UserError(f"{origins.get('device', source)}: option 'device' must be auto, cpu, cuda or cuda:N; got "
                        f"{short_repr(cfg.device)}")
    return cfg


def apply(cfg: Config, values: Dict[str, Any], source: str) -> Config:
    """Set `values` on `cfg` after checking names and types."""
    for key, value in values.items():
        opt = option(key) if isinstance(key, str) else None
        if opt is None or (key in PLUGIN_OPTIONS and key not in cfg.plugin_options):
            name = key if isinstance(key, str) and len(key) <= 60 else short_repr(key)
            shown = f"--{name}" if source == "command line" else name
            if key in PLUGIN_OPTIONS:
                hint = f"; it belongs to the plug-in {PLUGIN_OPTIONS[key].owner}, which custom_imports does not list"
            else:
                hint = did_you_mean(key, [*CORE, *cfg.plugin_options])
            raise UserError(f"{source}: unknown option '{shown}'{hint}")
        setattr(cfg, key, _coerce(opt, value, source))
    return cfg


def config_from_values(values: Dict[str, Any], source: str, overrides: Optional[Dict[str, Any]] = None,
                       config_file: Optional[str] = None, check: bool = True) -> Config:
    """A Config from a mapping of values (a YAML file's, a checkpoint's record) and command-line overrides.

    The plug-ins named by `custom_imports` (the overrides' if given, else the mapping's) are imported first;
    retired options in the mapping are dropped with a note.
    """
    values, _ = drop_retired(values, source)
    overrides = overrides or {}
    imports = overrides.get("custom_imports", values.get("custom_imports", []))
    imports = _coerce(CORE["custom_imports"], imports, "command line" if "custom_imports" in overrides else source)
    cfg = Config()
    resolved, options = import_plugins(imports, config_file, source)
    cfg.enable_plugin_options(options)
    apply(cfg, values, source)
    apply(cfg, overrides, "command line")
    resolve_paths(cfg, resolved)
    # A bad value is reported where it was given: the file names only what the command line did not override.
    origins = {**{key: source for key in values}, **{key: "command line" for key in overrides}}
    return validate(cfg, source, origins) if check else cfg


def resolve_paths(cfg: Config, custom_imports: List[str]) -> Config:
    """Make `cfg`'s paths absolute (relative ones are taken from the current folder, as they were meant), so that
    a run's configs.yaml names the same files wherever the run is used later: every option declared as a path,
    `pretrain_choice` when it names a file, and custom_imports as imported (files by absolute path)."""
    cfg.custom_imports = list(custom_imports)
    for name in [*CORE, *cfg.plugin_options]:
        value = getattr(cfg, name)
        if option(name).path and isinstance(value, str) and value:
            setattr(cfg, name, os.path.abspath(os.path.expanduser(value)))
    if os.path.isfile(cfg.pretrain_choice):
        cfg.pretrain_choice = os.path.abspath(cfg.pretrain_choice)
    return cfg


def build_config(config_file: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                 check: bool = True) -> Config:
    """Defaults, then `config_file`, then `overrides`; returns a validated Config."""
    values = read_yaml(config_file) if config_file else {}
    return config_from_values(values, config_file or "config", overrides, config_file, check)


def save_config(cfg: Config, path: str, leave_out: Sequence[str] = ()) -> None:
    """Write the resolved config as plain YAML (no tags), atomically, creating its folder if needed; without the
    options of `leave_out` (those of components the run does not use)."""
    write_atomic(path, yaml.safe_dump(cfg.to_dict(leave_out), sort_keys=True, default_flow_style=None),
                 what="config", make_folder=True)
