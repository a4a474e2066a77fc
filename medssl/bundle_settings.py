"""What a user may set on a bundle, and the checks that keep a setting from silently doing something else.

Three ways a setting used to go wrong, each refused here with one line naming the setting:

- **unknown keys**: MONAI adds any override to the config, so ``--set mask_ratoi=0.1`` trained
  with the default mask ratio and recorded the typo. :func:`check_known` refuses keys the
  bundle's config does not define, closest match first.
- **expressions in recorded settings**: MONAI evaluates ``$...`` strings, follows ``@...``
  references, loads ``%...`` files and instantiates ``_target_`` mappings. A ``run.json`` from
  a shared run folder is data, so :func:`check_plain` accepts plain values only.
- **dropped nulls**: ``python -m monai.bundle run --window_size None`` never reaches the config
  (MONAI's ``update_kwargs`` skips ``None`` values) and ``--window_size null`` arrives as the text
  ``'null'``. :func:`guard_monai_runner`, the first step of every bundle's ``initialize``, reads
  the command line MONAI was given and refuses both, naming the spelling that works.
  (``medssl`` itself builds the workflow directly, so its ``None`` values arrive.)
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["load_config", "config_settings", "check_known", "check_plain", "guard_monai_runner", "RUNNER_ARGS", "NULL_SPELLINGS"]

# Arguments of ``monai.bundle run`` / ``ConfigWorkflow`` that are not config overrides.
RUNNER_ARGS = frozenset({"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id", "tracking",
                         "workflow_name", "workflow_type", "properties_path"})
# How to ask for "none" without a null, for the settings that have one.
NULL_SPELLINGS = {"window_size": "0 (global attention only)"}
_CODE_PREFIXES = ("$", "@", "%")
_SPECIAL_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")
# "None" is what fire turns into Python None (then dropped); "null" arrives as text. ("none" is plain text: cache: none.)
_NULL_TEXTS = ("None", "null", "Null", "NULL")
_FALSE_TEXTS = ("false", "no", "off")  # fire reads False (and 0) as values, these as strings: truthy


def load_config(config_files: str | os.PathLike | Iterable) -> dict:
    """The raw content of a bundle config (or several, merged in order, as MONAI merges them)."""
    import yaml

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    merged: dict = {}
    for f in files:
        text = Path(f).read_text()
        merged.update((yaml.safe_load(text) if str(f).endswith((".yaml", ".yml")) else json.loads(text)) or {})
    return merged


def _is_setting(value) -> bool:
    """A user-facing value: a number, text, null or list of them (not an object, reference or expression)."""
    if isinstance(value, str):
        return not value.startswith(_CODE_PREFIXES)
    if isinstance(value, list):
        return all(_is_setting(v) for v in value)
    if isinstance(value, Mapping):
        return not any(k in value for k in _SPECIAL_KEYS) and all(_is_setting(v) for v in value.values())
    return True


def config_settings(config_files) -> tuple[set[str], list[str]]:
    """``(every top-level key, the user-facing settings among them)`` of a bundle config (or several, merged)."""
    return _settings_of(load_config(config_files))


def _settings_of(content: dict) -> tuple[set[str], list[str]]:
    keys = {k.split("#")[0] for k in content}
    settings = sorted(k for k, v in content.items() if "#" not in k and _is_setting(v))
    return keys, settings


def check_known(overrides: Mapping, known: set[str], settings: list[str], where: str) -> None:
    """Refuse override keys the config does not define (``a#b`` paths are checked by their first part)."""
    for key in overrides:
        root = str(key).split("#")[0]
        if root in known or root in RUNNER_ARGS:
            continue
        close = difflib.get_close_matches(root, settings, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        rest = [s for s in settings if s not in close]
        raise ValueError(f"unknown setting {key!r} for {where}: {hint}the settings are "
                         + ", ".join(close + rest))


def check_plain(settings: Mapping, where: str) -> None:
    """Refuse anything MONAI's parser would run: ``$`` expressions, ``@`` references, ``%`` file macros, ``_target_``."""

    def visit(value, path: str) -> None:
        if isinstance(value, str) and value.startswith(_CODE_PREFIXES):
            raise ValueError(f"{where}: setting {path!r} is {value[:60]!r}, an expression or reference MONAI would run; "
                             "settings there must be plain values (numbers, text, lists)")
        if isinstance(value, Mapping):
            for k, v in value.items():
                if k in _SPECIAL_KEYS:
                    raise ValueError(f"{where}: setting {path!r} holds {k!r}, which MONAI would instantiate; "
                                     "settings there must be plain values")
                visit(v, f"{path}#{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{path}#{i}")
        elif not (value is None or isinstance(value, (str, int, float, bool))):
            raise ValueError(f"{where}: setting {path!r} is a {type(value).__name__}, not a plain value")

    for key, value in settings.items():
        visit(value, str(key))


def _is_monai_runner(argv: list[str]) -> bool:
    first = Path(argv[0]) if argv else Path()
    return first.name == "__main__.py" and first.parent.name == "bundle" and first.parent.parent.name == "monai"


def _argv_pairs(args: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs of a fire command line (a bare ``--flag`` maps to None)."""
    pairs: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            key, sep, value = arg[2:].partition("=")
            if not sep:
                nxt = args[i + 1] if i + 1 < len(args) else None
                value = nxt if nxt is not None and not nxt.startswith("--") else None
                i += value is not None
            pairs[key.replace("-", "_") if key in ("config-file", "meta-file") else key] = value
        i += 1
    return pairs


def guard_monai_runner(argv: list[str] | None = None) -> None:
    """Under ``python -m monai.bundle``: one-line errors, and refuse settings MONAI would drop or misread.

    Does nothing elsewhere (``medssl``, Python code, tests), where settings arrive as given.
    """
    argv = sys.argv if argv is None else argv
    if not _is_monai_runner(argv):
        return
    from .errors import install_excepthook

    install_excepthook("python -m monai.bundle")
    pairs = _argv_pairs(argv[1:])
    config = pairs.get("config_file")
    if not config:
        return
    files = ast.literal_eval(config) if config.startswith("[") else [config]
    defaults = load_config(files)
    known, settings = _settings_of(defaults)
    check_known({k: v for k, v in pairs.items()}, known, settings, where=", ".join(str(f) for f in files))  # a typo first
    for key, value in pairs.items():
        if key in RUNNER_ARGS:
            continue
        if value is not None and isinstance(defaults.get(key), bool) and value.strip() != "False" \
                and value.strip().lower() in _FALSE_TEXTS:
            raise ValueError(f"--{key} {value}: MONAI's runner passes {value.strip()} as the text {value.strip()!r}, which "
                             f"Python reads as true, so the bundle would run with {key} on; write --{key} False")
        if value is not None and value.strip() in _NULL_TEXTS:
            spelled = NULL_SPELLINGS.get(key)
            hint = (f"write --{key} {spelled}" if spelled else
                    f"use `medssl pretrain --set {key}=null`, or set it to null in a copy of the config")
            raise ValueError(f"--{key} {value}: MONAI's runner drops a None override and reads null as text, so the bundle "
                             f"would run with its default {key}: {defaults.get(key)!r}; {hint}")
