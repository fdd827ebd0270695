"""Typed settings: the config dataclasses' fields with their help, parsing of ``--key value``
command-line settings and of JSON values, and the ``--help`` rendering. Shared by pre-training
(:class:`TrainConfig`, :class:`RunConfig`, the methods' configs) and fine-tuning
(:class:`train.finetune.FinetuneConfig`); it imports no method, so the method files can use it.

Values are checked against the field's type: ``int``, ``float``, ``str``, ``bool``
(``true/false/yes/no/1/0``; a bare ``--compile`` means true), a fixed set of choices
(``Literal``), ``none`` for optional fields, tuples as comma-separated values
(``--method.image_size 256,128``). A bad value is a :class:`common.errors.UserError` naming the
key and what it expected.

Config files (``--config FILE``, JSON or YAML) are read by :func:`read_config_file` and turned
into ``--key=value`` tokens by :func:`settings_tokens`, placed before the command line's: a file
goes through exactly the checks of the command line, and the command line overrides it.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from common.errors import UserError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("none", "null")
#: Line width of the preset descriptions in ``--help``.
HELP_WIDTH = 100


def setting(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """What every pre-training method shares; defaults are PASS's ViT-S settings (DESIGN.md 5)."""

    # data
    shards: str = setting("", "shard folder built by ``python -m shards build``, or an http(s)://, s3://, gs:// or "
                              "pipe: location of one (staged and verified on local disk first)")
    split: str = setting("train", "which split of the shards to train on")
    source: Literal["auto", "dali", "wds", "cache"] = setting("auto", "see pipelines.sources.make_source")
    num_workers: Optional[int] = setting(None, "webdataset workers / DALI threads (default: all cores)")
    skip_damaged: bool = setting(False, "train without shards whose content differs from the manifest (default: refuse them)")
    # length
    epochs: int = setting(100, "epochs of the schedules")
    max_steps: int = setting(0, "stop after this step of the full schedule (0: run every epoch)")
    batch_size: int = setting(128, "batch slots per process (images per process for one-image methods)")
    # optimizer and schedules
    optimizer: Literal["adamw", "sgd"] = setting("adamw", "adamw (fused on CUDA) or sgd (momentum sgd_momentum)")
    lr: float = setting(5e-4, "peak learning rate for a total batch of 256 (see lr_scaling)")
    lr_scaling: Literal["linear", "none"] = setting("linear", "linear: lr * total_batch / 256")
    min_lr: float = setting(1e-6, "end of the cosine")
    warmup_epochs: float = setting(10.0, "linear learning-rate warm-up from 0")
    weight_decay: float = setting(0.04, "start of the cosine weight-decay schedule")
    weight_decay_end: float = setting(0.4, "end of the cosine weight-decay schedule")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas")
    sgd_momentum: float = setting(0.9, "SGD momentum")
    sgd_nesterov: bool = setting(False, "Nesterov momentum for sgd (AGW: true)")
    lr_schedule: Literal["cosine", "step"] = setting(
        "cosine", "cosine: linear warm-up then cosine to min_lr; step: AGW's per-epoch warm-up (e+1)/warmup_epochs, "
        "then x lr_gamma at each of lr_milestones")
    lr_milestones: tuple[int, ...] = setting((), "epochs where the step schedule multiplies the lr by lr_gamma")
    lr_gamma: float = setting(0.1, "the step schedule's factor per milestone")
    clip_grad: float = setting(3.0, "0 disables clipping")
    clip_mode: Literal["param", "global"] = setting("param", "param: each tensor's norm (DINO/PASS); global: total norm")
    # execution
    precision: Literal["no", "bf16", "fp16"] = setting("bf16", "autocast dtype through accelerate")
    compile: bool = setting(False, "torch.compile the method (inductor) through accelerate")
    channels_last: bool = setting(False, "channels-last memory format for the method's conv weights")
    seed: int = setting(0, "seeds the model init, the data order and the views")
    # checkpoints and logs
    output_dir: str = setting("runs/pretrain", "run folder: config.json, metrics.jsonl, tensorboard/, checkpoints/")
    checkpoint_every_steps: int = setting(0, "0: only at epoch ends (checkpoint_every_epochs) and at the end")
    checkpoint_every_epochs: int = setting(1, "0: no epoch-end checkpoints")
    keep_last: int = setting(3, "complete checkpoints kept; older ones are deleted")
    log_every: int = setting(20, "steps between metric lines (also how often losses are checked)")
    progress_bar: bool = setting(True, "tqdm bar with loss and images/s (process 0)")
    log_with: str = setting("tensorboard", "experiment trackers (accelerate's): tensorboard (in output_dir/tensorboard), "
                                           "wandb, mlflow, several comma-separated, or none")
    # monitoring on the task (train.monitoring)
    monitor_every: int = setting(0, "epochs between retrieval evaluations of the frozen backbone (0: off)")
    monitor_shards: str = setting("", "shards with query/gallery splits to monitor on (default: --shards)")
    monitor_trials: int = setting(1, "SYSU-MM01: gallery draws per monitoring evaluation")

    def validate(self) -> None:
        """Refuse impossible values with a :class:`UserError` before anything is built."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "keep_last": self.keep_last,
                    "log_every": self.log_every, "monitor_trials": self.monitor_trials}
        for key, value in positive.items():
            if value < 1:
                raise UserError(f"--{key} must be at least 1, got {value}")
        non_negative = {"max_steps": self.max_steps, "lr": self.lr, "min_lr": self.min_lr,
                        "warmup_epochs": self.warmup_epochs, "clip_grad": self.clip_grad,
                        "checkpoint_every_steps": self.checkpoint_every_steps,
                        "checkpoint_every_epochs": self.checkpoint_every_epochs,
                        "weight_decay": self.weight_decay, "weight_decay_end": self.weight_decay_end,
                        "monitor_every": self.monitor_every}
        for key, value in non_negative.items():
            if value < 0:
                raise UserError(f"--{key} must not be negative, got {value}")
        if self.lr_schedule == "step" and self.warmup_epochs != int(self.warmup_epochs):
            raise UserError(f"--warmup_epochs must be whole epochs for the step schedule, got {self.warmup_epochs}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"--warmup_epochs {self.warmup_epochs} is longer than the run ({self.epochs} epochs)")
        if not self.shards:
            raise UserError("no shard folder given: pass --shards DIR (built by `python -m shards build`)")


@dataclass
class RunConfig:
    """A complete run: ``method`` names a :data:`train.methods.METHODS` entry and
    ``method_config`` is an instance of that entry's config dataclass."""

    method: str
    train: TrainConfig
    method_config: Any
    preset: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "preset": self.preset,
            "train": dataclasses.asdict(self.train),
            "method_config": dataclasses.asdict(self.method_config),
        }


def setting_pairs(tokens: list[str]) -> list[tuple[str, Optional[str]]]:
    """``["--a", "1", "--b=2", "--flag"]`` -> ``[("a", "1"), ("b", "2"), ("flag", None)]``."""
    pairs: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise UserError(f"expected a setting like --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if eq:
            pairs.append((key, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            pairs.append((key, tokens[i + 1]))
            i += 2
        else:
            pairs.append((key, None))
            i += 1
    return pairs


def parse_value(target: Any, name: str, text: Optional[str], key: str) -> Any:
    """``text`` converted to the type of field ``name`` of the dataclass instance ``target``."""
    hints = typing.get_type_hints(type(target))
    fields = [f.name for f in dataclasses.fields(target)]
    if name not in fields:
        prefix = "method." if key.startswith("method.") else ""
        close = difflib.get_close_matches(name, fields, n=3)
        hint = f"; did you mean {', '.join('--' + prefix + c for c in close)}?" if close else ""
        raise UserError(f"unknown setting --{key} for {type(target).__name__}{hint} (known: {', '.join(fields)})")
    try:
        return convert(text, hints[name])
    except ValueError as err:
        raise UserError(f"bad value for --{key}: {err}") from None


def convert(text: Optional[str], hint: Any) -> Any:
    """Parse command-line ``text`` as type ``hint``; ``ValueError`` says what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (text is None or text.lower() in NONE_WORDS):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise ValueError(f"unsupported field type {hint}")
        return convert(text, inner[0])
    if hint is bool:
        if text is None:
            return True
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if text is None:
        raise ValueError("a value is needed")
    if origin is Literal:
        if text not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}, got {text!r}")
        return text
    if origin is tuple:
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        kinds = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(parts) != len(kinds):
            raise ValueError(f"expected {len(kinds)} comma-separated values, got {text!r}")
        return tuple(convert(p.strip(), k) for p, k in zip(parts, kinds))
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if hint is int else 'a number'}, got {text!r}") from None
    if hint is str:
        return text
    raise ValueError(f"unsupported field type {hint}")


def from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of dataclass ``cls`` from JSON ``values`` (lists become tuples where the field
    is a tuple); unknown keys are an error, missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{cls.__name__} has no setting(s) {', '.join(unknown)}")
    kwargs = {}
    for key, value in values.items():
        is_tuple = typing.get_origin(hints[key]) is tuple or any(
            typing.get_origin(a) is tuple for a in typing.get_args(hints[key])
        )
        kwargs[key] = tuple(value) if is_tuple and isinstance(value, list) else value
    return cls(**kwargs)


def settings_help(instance: Any, prefix: str = "", skip: Collection[str] = ()) -> str:
    """One line per field of the dataclass ``instance`` (but those named in ``skip``, e.g. shown
    as command options): ``--prefix.name VALUE  help``, VALUE being the instance's (e.g. a
    preset's) value. Shared by ``--help`` of pre-training and fine-tuning."""
    lines = []
    for f in dataclasses.fields(instance):
        if f.name in skip:
            continue
        value = getattr(instance, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(f"  --{prefix}{f.name} {shown}".ljust(44) + f"  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(lines)


def summary_of(doc: Optional[str]) -> str:
    """The first paragraph of a docstring on one line: a preset's description in ``--help``
    (its first line alone often stops mid-sentence)."""
    paragraph = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(paragraph.split())


def presets_help(presets: Mapping[str, Callable[[], Any]], tag: Callable[[Any], str] = lambda config: "") -> str:
    """One entry per preset for ``--help``: its name, ``tag(preset())`` (e.g. ``[pass] ``) and
    :func:`summary_of` its docstring, wrapped under the name column."""
    entries = []
    for name, fn in presets.items():
        head = f"  {name:<18} "
        entries.append(textwrap.fill(f"{tag(fn())}{summary_of(fn.__doc__)}", width=HELP_WIDTH, initial_indent=head,
                                     subsequent_indent=" " * len(head), break_on_hyphens=False))
    return "\n".join(entries)




# --- config files ------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a ``--config`` file holds: JSON (``.json``) or YAML (anything else; JSON is
    YAML too). A missing or malformed file is a one-line :class:`UserError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read --config {path}: {err.strerror or err}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--config {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold a mapping of settings, got a {type(values).__name__}")
    return values


def value_text(value: Any) -> str:
    """A JSON / YAML value as the command-line text :func:`convert` parses back to it:
    ``None`` -> ``none``, booleans -> ``true`` / ``false``, lists -> comma-separated."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(value_text(v) for v in value)
    return str(value)


def settings_tokens(values: Mapping[str, Any], sections: Mapping[str, str] = {}) -> list[str]:
    """``--key=value`` tokens for a mapping of settings, so a config file takes the same path
    (and the same checks) as the command line. A value under a key of ``sections`` is itself a
    mapping whose keys get that prefix: ``{"method_config": {"out_dim": 8}}`` with
    ``sections={"method_config": "method."}`` -> ``--method.out_dim=8``."""
    tokens = []
    for key, value in values.items():
        if key in sections:
            if not isinstance(value, Mapping):
                raise UserError(f"config section {key!r} must be a mapping of settings")
            tokens += [f"--{sections[key]}{name}={value_text(v)}" for name, v in value.items()]
        else:
            tokens.append(f"--{key}={value_text(value)}")
    return tokens
