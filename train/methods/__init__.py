"""Pre-training methods, one file each. A method says how views are made, what the loss is and
what happens after an optimizer step; the loop (:mod:`train.pretrain`) knows nothing else about it.
The contract is :class:`train.methods.base.Method`.

:data:`METHODS` maps each ``--method`` name to a :class:`MethodEntry`: the method class (built
from its config), its config dataclass, its presets and the preset used when ``--preset`` is not
given. To add a method: write ``train/methods/<name>.py`` with the ``Method`` subclass, its config
dataclass, a ``<NAME>_PRESETS`` dict of preset functions and an ``upgrade`` function for renamed
settings (the identity at first), then add one entry below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from train.methods.base import Method
from train.methods.mmgl import MMGL, MMGL_PRESETS, MMGLConfig, upgrade_mmgl_config
from train.methods.pass_method import PASS, PASS_PRESETS, PASSConfig, upgrade_pass_config


@dataclass(frozen=True)
class MethodEntry:
    """How ``--method NAME`` is built: ``method(config)`` with ``config`` an instance of ``config``.
    ``upgrade`` turns the method's config of a saved ``config.json`` written by an older version
    into today's fields (renamed settings), so old checkpoints still load."""

    method: Callable[[Any], Method]
    config: type
    presets: Mapping[str, Callable[[], Any]]
    default_preset: str
    upgrade: Callable[[dict], dict]


METHODS: dict[str, MethodEntry] = {
    "pass": MethodEntry(PASS, PASSConfig, PASS_PRESETS, default_preset="pass_vits_lup", upgrade=upgrade_pass_config),
    "mmgl": MethodEntry(MMGL, MMGLConfig, MMGL_PRESETS, default_preset="mmgl_sysu", upgrade=upgrade_mmgl_config),
}

__all__ = ["METHODS", "MethodEntry"]
