"""Users' own models, data sets and losses, named by import path: ``package.module:attribute``.

A path is resolved with ``importlib`` only: the module must be importable where the run starts and on
every rank (installed, or on ``PYTHONPATH``); nothing is ever loaded from a file path, so a run
directory (or any folder a config names) never contributes code. A path that does not resolve is a
``ConfigError`` (exit 2) naming the config key, the module and the attribute.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .safe_yaml import clip

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_path(name: str) -> bool:
    """Whether a ``*.name`` value means user code (built-in names have no colon)."""
    return ":" in name


def resolve(path: str, key: str) -> Callable[..., Any]:
    """The callable ``path`` names; ``key`` (e.g. ``model.name``) starts every error message."""
    what = f"{key} = '{clip(path)}'"
    if not IMPORT_PATH.fullmatch(path):
        raise ConfigError(f"{what}: an import path is package.module:attribute (e.g. my_project.models:build)")
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        top = module_name.partition(".")[0]
        raise ConfigError(
            f"{what}: cannot import module '{module_name}' ({type(exc).__name__}: {exc}); on every node, "
            f"pip install it or put the folder holding '{top}' on PYTHONPATH"
        ) from None
    try:
        target = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        hint = difflib.get_close_matches(attribute, [n for n in dir(module) if not n.startswith("_")], n=1)
        raise ConfigError(
            f"{what}: module '{module_name}' has no attribute '{attribute}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
        ) from None
    if not callable(target):
        raise ConfigError(f"{what}: '{attribute}' in module '{module_name}' is a {type(target).__name__}, not callable")
    return target
