"""The command line of every entry point, tool and benchmark, on argparse; `run_main` turns a UserError into one
line and an exit code.

A command is a `Parser` from `command(...)` that declares its own flags with argparse's `add_argument`
(`add_shared`: --debug, --trust_checkpoint, --compat). `parse_command_line` adds the schema's config options
(utils/schema.py, plug-ins' included) as `--<name>` arguments, which `--help` lists under "config options" with
type, default and help, and returns an argparse Namespace: the flags, `overrides` (the config options given, as
raw text: utils/config.py converts and checks them, naming the command line) and `positionals` (run folders,
where the command takes them).

- A config option takes the tokens that follow it up to the next option (`--img_size 384 128` is a list, a lone
  `--img_aug` is `true`); `--key=value` gives one value. A command with positional arguments (`sh run.sh test`)
  gives an option one token at most, so that `--root_dir X RUN` means root_dir X and run folder RUN; lists are
  then written `384,128`.
- A plug-in declares its options only when its custom_imports is read, once parsing is done: argparse leaves
  them over (`parse_known_args`) and they are read here by the same rules.
- A flag or option given twice is an error unless it repeats by design (action "append" or "extend").
- A bad command line is one line, `error: command line: ...`, exit status 2: a UserError under
  parse_command_line, an exit under a benchmark's own `parse_args`. `-h` / `--help` exits 0.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from utils.errors import UserError, closest, did_you_mean, short_repr
from utils.schema import type_name


def integer(text: str) -> int:
    """A decimal integer, optionally signed (int() would also take '1_0' and ' 1 ')."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(text)
    return int(text)


_TYPE_NAMES = {integer: "an integer", int: "an integer", float: "a number"}

# torch.manual_seed would take seeds up to 2**64 - 1, but the samplers and the noisy-pair draw use a seed modulo
# 2**63 (datasets/samplers.py, datasets/noise.py): a larger seed would repeat a smaller one's data order.
SEED_MAX = 2 ** 63 - 1


def check_seed_range(option: str, seed: int) -> None:
    """A seed above what the run's generators tell apart (SEED_MAX) is refused naming `option` (`--seed`), rather
    than failing with a traceback once training has begun; below 0 is the config's or seed_runs' to refuse."""
    if seed > SEED_MAX:
        raise UserError(f"command line: {option} takes seeds from 0 to {SEED_MAX} (2**63 - 1); got "
                        f"{short_repr(seed)}")


class _Refused(argparse.ArgumentTypeError):
    """A value refused by a flag's type or choices, in the project's words."""


class _Flag(argparse.Action):
    """argparse's store, store_true, append and extend with the project's rules: used once unless it repeats by
    design; a refused value named with what it must be (`expects`), a missing one with what is needed (`needs`);
    `ends`: a test of a bare token that ends the values of an nargs "+" flag (see _cut_at_ends)."""

    def __init__(self, option_strings, dest, kind="store", expects="", needs="", ends=None, **kwargs):
        if kind == "store_true":
            kwargs.update(nargs=0, const=True, default=kwargs.get("default", False))
        elif kind in ("append", "extend") and kwargs.get("default") is None:
            kwargs["default"] = []
        super().__init__(option_strings, dest, **kwargs)
        self.kind, self.expects, self.needs, self.ends = kind, expects, needs, ends
        if self.nargs != 0:
            self.type = functools.partial(self._checked, self.type or str)
        shown = self.default not in (None, "", [], argparse.SUPPRESS) and not isinstance(self.default, bool)
        if shown and self.help not in (None, argparse.SUPPRESS) and "%(default)" not in self.help:
            self.help += " (default: %(default)s)"

    def _checked(self, convert: Callable[[str], Any], token: str) -> Any:
        try:
            value = convert(token)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            expected = self.expects or _TYPE_NAMES.get(convert, "a valid value")
            raise _Refused(f"takes {expected}; got {short_repr(token)}") from None
        if self.choices is not None and value not in self.choices:
            raise _Refused(f"must be one of {', '.join(map(str, self.choices))}; got {short_repr(token)}")
        return value

    def __call__(self, parser, namespace, values, option_string=None):
        if self.kind in ("append", "extend"):
            items = list(getattr(namespace, self.dest, None) or [])
            setattr(namespace, self.dest, items + (list(values) if self.kind == "extend" else [values]))
            return
        parser.once(self, option_string)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class _ConfigValue(argparse.Action):
    """A config option: its raw text (`true` alone, a list for several tokens), for utils/config.py to convert and
    check. Not given, it is absent (default SUPPRESS), so that the config file's value stays."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.once(self, option_string)
        if isinstance(values, list):
            values = "true" if not values else values[0] if len(values) == 1 else values
        setattr(namespace, self.dest, values)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _format_action_invocation(self, action):
        # A config option reads as the schema describes it, `--lr (float, default 3e-06)`, not `--lr [LR ...]`;
        # argparse has no public hook for this part of the help.
        if isinstance(action, _ConfigValue):
            return f"{action.option_strings[0]} {action.metavar}"
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser without abbreviations (`--config` is no `--config_file`), with the project's flags
    (_Flag) and one-line errors: printed with exit status 2, or raised as a UserError when `exit_on_error` is
    False. `positionals`: the name of the bare tokens it takes ("RUN_DIR"), "" for none; `options`: whether it
    takes config options."""

    def __init__(self, *args, positionals: str = "", options: bool = False, exit_on_error: bool = True, **kwargs):
        self.named: Dict[str, argparse.Action] = {}  # by option string; filled by add_argument
        self.given: Dict[str, str] = {}
        super().__init__(*args, allow_abbrev=False, exit_on_error=False, formatter_class=_Formatter, **kwargs)
        self.positionals, self.options, self.exits = positionals, options, exit_on_error
        for kind in (None, "store", "store_true", "append", "extend"):
            self.register("action", kind, functools.partial(_Flag, kind=kind or "store"))

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.named.update(dict.fromkeys(action.option_strings, action))
        return action

    def parse_known_args(self, args=None, namespace=None):
        self.given = {}
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as e:
            self.error(_explain(self, e))

    def once(self, action: argparse.Action, option_string: str) -> None:
        if action.dest in self.given:
            raise argparse.ArgumentError(None, f"option '{option_string}' is given twice; give it once")
        self.given[action.dest] = option_string

    def error(self, message: str):
        if not self.exits:
            raise UserError(f"command line: {message}")
        # argparse would print the usage and `prog: error: ...`: the project's errors are one line.
        print(f"error: command line: {message}", file=sys.stderr)
        raise SystemExit(2)


def _explain(parser: Parser, error: argparse.ArgumentError) -> str:
    """An ArgumentError in the project's words: a refused value as its check said, a missing or unwanted one from
    what the flag takes."""
    name, action = error.argument_name, parser.named.get(error.argument_name or "")
    if name is None or isinstance(error.__context__, _Refused) or not isinstance(action, _Flag):
        return error.message if name is None else f"{name} {error.message}"
    if action.nargs == 0:
        return f"{name} takes no value"
    return f"{name} needs {action.needs or ('at least one value' if action.nargs == '+' else 'a value')}"


def command(prog: str, description: str, positionals: str = "", options: bool = True, epilog: str = "") -> Parser:
    """A command's parser, on which it declares its flags with `add_argument`; read with parse_command_line."""
    return Parser(prog=prog, description=description, epilog=epilog or None, positionals=positionals,
                  options=options)


_SHARED = {
    "debug": dict(action="store_true", help="show Python tracebacks for errors"),
    "trust_checkpoint": dict(action="store_true", help="allow checkpoints that need full unpickling (only for "
                                                       "files you trust)"),
    # The modes are the registered layouts' (model/layouts.py), which loading checks: this layer cannot list them.
    "compat": dict(default="auto", metavar="MODE", help="the mode a run is evaluated in: 'none' (every head's own, "
                   "batch-independent), a published release's own mode (its layout's, e.g. a batch-dependent "
                   "one), 'auto' (a published run's release mode, a run of this project's own configuration)")}


def add_shared(parser: Parser, *names: str, **defaults: Any) -> None:
    """The flags several commands share, by name (debug, trust_checkpoint, compat), with other `defaults`."""
    for name in names:
        changed = {"default": defaults[name]} if name in defaults else {}
        parser.add_argument(f"--{name}", **{**_SHARED[name], **changed})


def parse_command_line(command: Parser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`argv` (default sys.argv[1:]) read as `command` declares, with the config options where it takes them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, options = _full_parser(command, argv)
    namespace, extras = parser.parse_known_args(_cut_at_ends(parser, argv))
    flags = vars(namespace)
    flags.pop(_END, None)
    overrides = {name: flags.pop(name) for name in list(flags) if name in options}
    positionals = _read_leftovers(parser, extras, overrides)
    seeds = [("--seed", overrides.get("seed"))] + [("--seeds", seed) for seed in flags.get("seeds") or []]
    for name, seed in seeds:  # a seed that is no integer is left to the config's own message
        if isinstance(seed, (int, str)) and re.fullmatch(r"[+-]?[0-9]+", str(seed).strip()):
            check_seed_range(name, int(seed))
    return argparse.Namespace(**flags, overrides=overrides, positionals=positionals)


_END = "--(end of values)"  # placed by _cut_at_ends; a token nobody types


def _full_parser(command: Parser, argv: List[str]) -> Tuple[Parser, List[str]]:
    """The command's flags and, where it takes them, the config options, in a parser built anew for each parse
    (the options grow as plug-ins are imported); also the options' names."""
    usage = command.format_usage().replace("usage: ", "", 1).strip().replace("%", "%%") + \
        (" [--OPTION VALUE ...]" if command.options else "") + \
        (f" [{command.positionals} ...]" if command.positionals else "")
    parser = Parser(prog=command.prog, usage=usage, description=command.description, epilog=command.epilog,
                    parents=[command], add_help=False, exit_on_error=False, positionals=command.positionals,
                    options=command.options)
    parser.named.update(command.named)
    parser.add_argument(_END, action="count", dest=_END, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if not command.options:
        return parser, []
    from utils.config import option_names
    names, note = _help_options(argv) if "-h" in argv or "--help" in argv else (option_names(), "")
    return parser, _add_options(parser, names, note)


def _help_options(argv: List[str]) -> Tuple[List[str], str]:
    """The options --help lists: this project's, and the plug-ins' that --config_file or --custom_imports name."""
    from utils.config import CORE, build_config

    def after(flag: str) -> List[str]:
        start = argv.index(flag) + 1 if flag in argv else len(argv)
        return [t for t in argv[start:start + 50] if not t.startswith("--")]

    config_file, imports = (after("--config_file") or [None])[0], after("--custom_imports")
    try:
        cfg = build_config(config_file if config_file and os.path.isfile(config_file) else None,
                           {"custom_imports": imports} if imports else None, check=False)
        return [*CORE, *cfg.plugin_options], ""
    except UserError as e:
        return list(CORE), f"(plug-in options not listed: {e})\n"


def _add_options(parser: Parser, names: Sequence[str], note: str) -> List[str]:
    """The options `names` as `--<name>` arguments of `parser` (a flag of the command's own of that name wins);
    returns the names added."""
    from utils.config import option
    one = bool(parser.positionals)
    group = parser.add_argument_group("config options", f"{note}any of them as --key value, or in the --config_file "
                                      f"YAML; a list as --img_size {'384,128' if one else '384 128'}; a lone --key "
                                      "means true")
    taken = set(parser.named) | {action.dest for action in parser.named.values()}
    added = []
    for opt in map(option, names):
        if opt is None or f"--{opt.name}" in taken or opt.name in taken:
            continue
        owner = f", from {opt.owner}" if opt.owner != "core" else ""
        text = opt.help + (f" One of: {', '.join(map(str, opt.choices))}." if opt.choices else "")
        group.add_argument(f"--{opt.name}", action=_ConfigValue, nargs="?" if one else "*", const="true",
                           default=argparse.SUPPRESS, help=text.replace("%", "%%"),
                           metavar=f"({type_name(opt.type)}, default {opt.default!r}{owner})")
        added.append(opt.name)
    return added


def _cut_at_ends(parser: Parser, argv: List[str]) -> List[str]:
    """argv with the end marker before a token that ends a flag's values (`ends`: a run folder after
    --cross_datasets FILE ...), since argparse's nargs counts tokens and cannot look at them."""
    out, ends, taken = [], None, 0
    for token in argv:
        if token.startswith("-"):
            ends, taken = getattr(parser.named.get(token), "ends", None), 0
        elif ends is not None and taken and ends(token):
            out.append(_END)
            ends = None
        else:
            taken += 1
        out.append(token)
    return out


def _read_leftovers(parser: Parser, extras: List[str], overrides: Dict[str, Any]) -> List[str]:
    """What argparse left over: bare tokens (positional arguments, where the command takes them) and options it
    did not know, read into `overrides` by the rules of the module's docstring; returns the positionals."""
    positionals: List[str] = []
    i = 0
    while i < len(extras):
        token = extras[i]
        i += 1
        if not token.startswith("--") or token == "--":
            if not parser.positionals:
                raise UserError(f"command line: expected an option starting with '--', got {short_repr(token)}")
            positionals.append(token)
            continue
        key, has_value, inline = token[2:].partition("=")
        _check_option_name(parser, key, overrides)
        values = [inline] if has_value else []
        while not has_value and i < len(extras) and not extras[i].startswith("--") and \
                not (parser.positionals and values):
            values.append(extras[i])
            i += 1
        overrides[key] = "true" if not values else values[0] if len(values) == 1 else values
    return positionals


def _check_option_name(parser: Parser, key: str, overrides: Dict[str, Any]) -> None:
    """An option argparse did not know may be a plug-in's, given once; a name close to one of the command's flags
    is named with that flag (other unknown names get their suggestion when the config is built)."""
    flags = [name[2:] for name in parser.named if name.startswith("--") and name != _END]
    if not parser.options:
        raise UserError(f"command line: unknown option '--{key}'{did_you_mean(key, flags, '--')}")
    if key in overrides:
        raise UserError(f"command line: option '--{key}' is given twice; give it once")
    from utils.config import option_names
    close = closest(key, flags + option_names()) if key else None
    if close in flags:
        raise UserError(f"command line: unknown option '--{key}'; did you mean '--{close}'?")



def run_main(main: Callable[[List[str]], int], argv: Optional[List[str]] = None) -> None:
    """Call `main(argv)`; a UserError becomes 'error: <message>' on stderr and its exit code, unless --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(argv)
    except UserError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", 2)
        # Release what the failed call held (e.g. data-loader workers) now: torch re-raises a worker's error from
        # a frame that refers to it, a cycle that the garbage collector would otherwise meet much later and then
        # stop each worker only after a 5 s timeout.
        traceback.clear_frames(e.__traceback__)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
