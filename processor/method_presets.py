"""The methods `sh run.sh methods` compares: each method registers its name and its presets beside its code
(methods/<name>/__init__.py), as a plug-in may:

    register_method("Mine", demo="mine_demo", paper="mine")   # configs/mine_demo.yaml, configs/mine_<cuhk|...>.yaml

The table lists them by name, whatever order their modules were imported in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from utils.plugins import load_methods


@dataclass(frozen=True)
class Method:
    name: str
    demo: str  # the preset (configs/<demo>.yaml) of the Demo table
    paper: str  # the paper presets' prefix: configs/<paper>_<cuhk|icfg|rstp>.yaml

    def preset(self, paper: Optional[str]) -> str:
        return f"{self.paper}_{paper}" if paper else self.demo


_METHODS: Dict[str, Method] = {}


def register_method(name: str, *, demo: str, paper: str) -> Method:
    """Add a method to the table (a name taken by another is a ValueError: a programming error)."""
    method = Method(name, demo, paper)
    if _METHODS.get(name, method) != method:
        raise ValueError(f"method {name!r} is already registered")
    _METHODS[name] = method
    return method


def table_methods() -> List[Method]:
    """Every registered method, in the table's order."""
    load_methods()
    return sorted(_METHODS.values(), key=lambda method: method.name.lower())
