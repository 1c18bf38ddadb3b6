"""The command line of every entry point and tool: one parser, and turning a UserError into one line + exit code.

A command declares its own flags (`Flag`: `--config_file FILE`, `--seeds N ...`, `--audit`); every other `--key`
is a config option (an override, checked by name and type once the config is built, plug-ins' options included).
Bare tokens are positional arguments (run folders) where the command takes them, else an error.

How values are read:
- `--key=value` gives one value.
- A config option takes the tokens that follow it up to the next option (`--img_size 384 128` is a list, a lone
  `--img_aug` is `true`). A command with positional arguments (`sh run.sh test`) gives an option one token at
  most, so that `--root_dir X RUN` means root_dir X and run folder RUN; lists are then written `384,128`.
- A flag takes no value (a switch), one, or several (`nargs="+"`: up to the next option, or a token its `ends`
  test stops at). A flag given twice is an error unless it is `repeat`ed by design (`--config_file A
  --config_file B`), and so is a config option given twice.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from utils.errors import UserError, closest, did_you_mean, short_repr
from utils.schema import COMPAT_MODES


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


@dataclass(frozen=True)
class Flag:
    """A flag of one command (not a config option): `--name`, with what it takes."""

    name: str
    help: str = ""
    nargs: Union[int, str] = 1  # 0: a switch; 1: one value; "+": one or more
    type: Callable[[str], Any] = str
    default: Any = None
    choices: Optional[Sequence[str]] = None
    dest: str = ""  # where the value goes (default: name); flags sharing a dest append to one list
    repeat: bool = False  # may be given several times; the values are collected in order
    required: bool = False
    metavar: str = ""
    ends: Optional[Callable[[str], bool]] = None  # with nargs "+": a bare token that ends the values
    expects: str = ""  # what a value must be, for the message when `type` refuses one (default: from the type)
    needs: str = ""  # what is missing when no value follows, for the message (default: "a value" / "at least one")

    @property
    def key(self) -> str:
        return self.dest or self.name


DEBUG = Flag("debug", "show Python tracebacks for errors", nargs=0)
TRUST = Flag("trust_checkpoint", "allow checkpoints that need full unpickling (only for files you trust)", nargs=0)
COMPAT = Flag("compat", "how a run's PHP head attends when loaded: 'none' (batch-independent), 'php_v1' (across the "
                        "batch, as the PHP reference release), 'auto' (php_v1 for published PHP checkpoints only)",
              choices=COMPAT_MODES, default="auto")


@dataclass(frozen=True)
class Command:
    prog: str
    description: str
    flags: Sequence[Flag] = ()
    positionals: str = ""  # the name of bare tokens in the usage line ("RUN_DIR"); "": none are taken
    overrides: bool = True  # --key value config options are taken
    epilog: str = ""

    def flag(self, name: str) -> Optional[Flag]:
        return next((f for f in self.flags if f.name == name), None)


class Parsed:
    """A parsed command line: `flags` (by dest, also as attributes), config `overrides`, `positionals`."""

    def __init__(self, flags: Dict[str, Any], overrides: Dict[str, Any], positionals: List[str]):
        self.flags, self.overrides, self.positionals = flags, overrides, positionals

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["flags"][name]
        except KeyError:
            raise AttributeError(name) from None


def parse_command_line(command: Command, argv: Optional[Sequence[str]] = None) -> Parsed:
    """`argv` (default sys.argv[1:]) read as `command` declares; `-h` / `--help` prints the help and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help(command, argv)
        raise SystemExit(0)
    flags = {f.key: ([] if f.repeat else (False if f.nargs == 0 else f.default)) for f in command.flags}
    given: Dict[str, str] = {}
    overrides: Dict[str, Any] = {}
    positionals: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            if not command.positionals:
                raise UserError(f"command line: expected an option starting with '--', got {short_repr(token)}")
            positionals.append(token)
            continue
        key, has_value, inline = token[2:].partition("=")
        flag = command.flag(key)
        if flag is not None:
            values, i = _flag_values(flag, argv, i, inline if has_value else None)
            _store(flags, given, flag, values)
        else:
            _check_option_name(command, key, overrides)
            values, i = _option_values(command, argv, i, inline if has_value else None)
            overrides[key] = values
    missing = [f.name for f in command.flags if f.required and not flags[f.key]]
    if missing:
        raise UserError(f"command line: --{missing[0]} is required")
    _check_seeds(command, flags, overrides)
    return Parsed(flags, overrides, positionals)


def _check_seeds(command: Command, flags: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """`--seed N` (a config option, still text here) and a command's `--seeds N ...` within SEED_MAX; a seed that
    is no integer is left to the config's own message."""
    seed = overrides.get("seed")
    if isinstance(seed, str):
        try:
            check_seed_range("--seed", integer(seed.strip()))
        except ValueError:
            pass
    if command.flag("seeds") is not None:
        for value in flags.get("seeds") or []:
            if isinstance(value, int):
                check_seed_range("--seeds", value)


def _flag_values(flag: Flag, argv: List[str], i: int, inline: Optional[str]):
    """The converted value(s) of `flag` at argv[i:] (or its inline `=value`), and the index after them."""
    if flag.nargs == 0:
        if inline is not None:
            raise UserError(f"command line: --{flag.name} takes no value; got {short_repr(inline)}")
        return True, i
    if inline is not None:
        tokens = [inline]
    elif flag.nargs == 1:
        tokens = argv[i:i + 1] if i < len(argv) and not argv[i].startswith("--") else []
    else:
        tokens = []
        while i + len(tokens) < len(argv):
            t = argv[i + len(tokens)]
            if t.startswith("--") or (flag.ends is not None and tokens and flag.ends(t)):
                break
            tokens.append(t)
    if not tokens:
        needs = flag.needs or ("a value" if flag.nargs == 1 else "at least one value") + (
            f" ({flag.help})" if flag.help else "")
        raise UserError(f"command line: --{flag.name} needs {needs}")
    values = [_convert(flag, t) for t in tokens]
    return (values[0] if flag.nargs == 1 else values), i + (0 if inline is not None else len(tokens))


def _convert(flag: Flag, token: str) -> Any:
    try:
        value = flag.type(token)
    except (TypeError, ValueError):
        expected = flag.expects or _TYPE_NAMES.get(flag.type, "a valid value")
        raise UserError(f"command line: --{flag.name} takes {expected}; got {short_repr(token)}") from None
    if flag.choices is not None and value not in flag.choices:
        raise UserError(f"command line: --{flag.name} must be one of {', '.join(map(str, flag.choices))}; got "
                        f"{short_repr(token)}")
    return value


def _store(flags: Dict[str, Any], given: Dict[str, str], flag: Flag, values: Any) -> None:
    if flag.repeat:
        flags[flag.key].extend(values if isinstance(values, list) else [values])
        return
    if flag.key in given:
        twice = f"--{flag.name}" if given[flag.key] == flag.name else f"--{given[flag.key]} and --{flag.name}"
        raise UserError(f"command line: {twice} given twice; give it once")
    given[flag.key] = flag.name
    flags[flag.key] = values


def _check_option_name(command: Command, key: str, overrides: Dict[str, Any]) -> None:
    """A config option may be given once; a name that is no option but close to one of the command's flags is
    named with that flag (other unknown names get their suggestion when the config is built)."""
    names = [f.name for f in command.flags]
    if not command.overrides:
        raise UserError(f"command line: unknown option '--{key}'{did_you_mean(key, names, '--')}")
    if key in overrides:
        raise UserError(f"command line: option '--{key}' is given twice; give it once")
    from utils.config import option_names
    if key and key not in option_names():
        close = closest(key, names + option_names())
        if close in names:
            raise UserError(f"command line: unknown option '--{key}'; did you mean '--{close}'?")


def _option_values(command: Command, argv: List[str], i: int, inline: Optional[str]):
    """A config option's value: the inline one, else the following tokens up to the next option (at most one
    when the command takes positional arguments); none means `true`."""
    if inline is not None:
        return inline, i
    values = []
    while i < len(argv) and not argv[i].startswith("--") and not (command.positionals and values):
        values.append(argv[i])
        i += 1
    return ("true" if not values else values[0] if len(values) == 1 else values), i


def print_help(command: Command, argv: Sequence[str]) -> None:
    """The command's usage, its flags, and (when it takes config options) every option, a plug-in's included when
    --config_file or --custom_imports names it."""
    usage = f"usage: {command.prog} [options]" + (f" [{command.positionals} ...]" if command.positionals else "")
    lines = [usage, "", command.description.strip(), "", "flags:"]
    for flag in command.flags:
        shape = "" if flag.nargs == 0 else f" {flag.metavar or flag.name.upper()}" + (" ..." if flag.nargs == "+"
                                                                                          else "")
        extra = f" (one of {', '.join(flag.choices)})" if flag.choices else ""
        extra += f" (default {flag.default})" if flag.default not in (None, False, "") else ""
        lines.append(f"  --{flag.name}{shape}")
        lines.extend(textwrap.wrap(flag.help + extra, 110, initial_indent="      ", subsequent_indent="      "))
    if command.epilog:
        lines += ["", command.epilog.strip()]
    print("\n".join(lines))
    if command.overrides:
        print()
        print(_options_help(argv))


def _options_help(argv: Sequence[str]) -> str:
    from utils.config import build_config, describe_options

    def after(flag: str) -> List[str]:
        if flag not in argv:
            return []
        start = list(argv).index(flag) + 1
        return [t for t in argv[start:start + 50] if not t.startswith("--")][:50]

    cfg, note = None, ""
    try:
        config_file = (after("--config_file") or [None])[0]
        imports = after("--custom_imports")
        cfg = build_config(config_file if config_file and os.path.isfile(config_file) else None,
                           {"custom_imports": imports} if imports else None, check=False)
    except UserError as e:
        note = f"(plug-in options not listed: {e})\n\n"
    return note + describe_options(cfg)


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
