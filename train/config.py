"""Run configuration: typed dataclasses, named presets, command-line overrides, JSON.

(The types and the parsing of single values live in :mod:`train.settings`, which the method
files import; this module adds what needs the method registry.)

A run is described by a :class:`RunConfig`: the method's name, the shared :class:`TrainConfig`
(data, optimizer, schedules, precision, checkpoints, logging) and the method's own config
dataclass (e.g. :class:`train.methods.pass_method.PASSConfig`), plus the preset it came from.

Presets
-------
A preset is a named function returning a complete :class:`RunConfig`. Each method file keeps its
own (``PASS_PRESETS`` in :mod:`train.methods.pass_method`) and lists them in its
:data:`train.methods.METHODS` entry; :func:`preset_registry` collects them all. Presets are plain
functions, not a hierarchy: one preset may call another and change fields with
``dataclasses.replace``.

Overrides
---------
After the preset, ``--key value`` pairs on the command line change single fields:

- ``--epochs 3``, ``--batch_size 64``: shared fields (:class:`TrainConfig`), by their name
  (``--train.epochs`` works too);
- ``--method.out_dim 1024``: fields of the method's config;
- ``--key=value`` works as well as ``--key value``; dashes in keys count as underscores;
- values are checked against the field's type: ``int``, ``float``, ``str``, ``bool``
  (``true/false/yes/no/1/0``; a bare ``--compile`` means true), a fixed set of choices
  (``Literal``), ``none`` for optional fields, tuples as comma-separated values
  (``--method.image_size 256,128``).

An unknown key or a bad value is a :class:`common.errors.UserError` naming the key, what it
expected and (for a typo) the closest known keys.

The resolved configuration is printed at the start of a run and saved as ``config.json`` in the
output folder and in every checkpoint (:func:`save_config` / :func:`load_config`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from common.errors import UserError
from train.methods import METHODS
from train.settings import (
    RunConfig,
    TrainConfig,
    from_dict,
    parse_value,
    read_config_file,
    setting_pairs,
    settings_tokens,
)

PresetFn = Callable[[], RunConfig]


def preset_registry() -> dict[str, PresetFn]:
    """Every preset of every registered method, by name."""
    registry: dict[str, PresetFn] = {}
    for entry in METHODS.values():
        for name, fn in entry.presets.items():
            if name in registry:
                raise RuntimeError(f"preset {name!r} is defined twice")
            registry[name] = fn
    return registry


def resolve_config(method: Optional[str], preset: Optional[str], overrides: Iterable[str] = (),
                   config_file: Optional[str | Path] = None) -> RunConfig:
    """The configuration of a run: the preset (the method's default one when ``preset`` is None),
    then the settings of ``config_file`` (JSON or YAML: a saved ``config.json``, or a hand-written
    file with ``train`` / ``method_config`` sections or flat ``key: value`` override keys), then the
    command-line ``overrides`` (module docstring). ``method`` and ``preset`` come from the file when
    not given; ``method`` may be None when the preset names it."""
    tokens = list(overrides)
    if config_file is not None:
        values = read_config_file(config_file)
        method = method or values.pop("method", None)
        preset = preset or values.pop("preset", None)
        values = {k: v for k, v in values.items() if k not in ("method", "preset")}
        owner = method or _preset_method(preset)
        if isinstance(values.get("method_config"), dict) and owner in METHODS:  # an older run's names
            values["method_config"] = METHODS[owner].upgrade(values["method_config"])
        tokens = settings_tokens(values, {"train": "", "method_config": "method."}) + tokens
    if method is not None and method not in METHODS:
        raise UserError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    registry = preset_registry()
    if preset is None:
        if method is None:
            raise UserError(f"pass --method ({', '.join(METHODS)}) or --preset ({', '.join(registry)})")
        preset = METHODS[method].default_preset
    if preset not in registry:
        raise UserError(f"unknown preset {preset!r}; expected one of: {', '.join(registry)}")
    config = registry[preset]()
    if method is not None and config.method != method:
        raise UserError(f"preset {preset!r} is for method {config.method!r}, not {method!r}")
    config.preset = preset
    return apply_overrides(config, tokens)


def _preset_method(preset: Optional[str]) -> Optional[str]:
    """The method a registered preset is for (None for no or an unknown preset)."""
    registry = preset_registry()
    return registry[preset]().method if preset in registry else None


def apply_overrides(config: RunConfig, tokens: list[str]) -> RunConfig:
    """``config`` with the ``--key value`` pairs of ``tokens`` applied (module docstring)."""
    train = dataclasses.replace(config.train)
    method_config = dataclasses.replace(config.method_config)
    for key, text in setting_pairs(tokens):
        namespace, name = _split_key(key)
        target = method_config if namespace == "method" else train
        setattr(target, name, parse_value(target, name, text, key))
    return RunConfig(config.method, train, method_config, config.preset)


def _split_key(key: str) -> tuple[str, str]:
    key = key.replace("-", "_")
    namespace, dot, name = key.partition(".")
    if not dot:
        return "train", key
    if namespace not in ("train", "method") or not name:
        raise UserError(f"unknown setting --{key}: use --name for shared settings or --method.name for the method's")
    return namespace, name


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """The inverse of :meth:`RunConfig.to_dict`."""
    name = values.get("method")
    if name not in METHODS:
        raise UserError(f"the configuration names method {name!r}, which is not registered ({', '.join(METHODS)})")
    return RunConfig(
        method=name,
        train=from_dict(TrainConfig, values.get("train", {})),
        method_config=from_dict(METHODS[name].config, METHODS[name].upgrade(dict(values.get("method_config", {})))),
        preset=values.get("preset"),
    )


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as indented JSON to ``path``."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n")


def load_config(path: str | Path) -> RunConfig:
    """Read a configuration written by :func:`save_config`."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the run configuration {path}: {err}") from None
    return config_from_dict(values)


def config_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """``key: old -> new`` for every setting that differs (``method.``-prefixed for the method's)."""
    flat_old, flat_new = flatten(old), flatten(new)
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in flat_new if flat_old.get(k) != flat_new.get(k)]


def flatten(config: RunConfig) -> dict[str, Any]:
    """``{"method": ..., "preset": ..., "epochs": ..., "method.out_dim": ...}``: the override keys."""
    flat: dict[str, Any] = {"method": config.method, "preset": config.preset}
    flat.update(dataclasses.asdict(config.train))
    flat.update({f"method.{k}": v for k, v in dataclasses.asdict(config.method_config).items()})
    return flat


def describe(config: RunConfig) -> str:
    """The configuration as ``key = value`` lines, for the start of a run's output."""
    return "\n".join(f"  {k} = {v}" for k, v in flatten(config).items())


__all__ = [
    "PresetFn",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "describe",
    "flatten",
    "load_config",
    "preset_registry",
    "resolve_config",
    "save_config",
]
