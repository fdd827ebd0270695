"""Atomic, resumable checkpoints of the whole training state, through accelerate.

Layout: ``RUN/checkpoints/step_00001234/`` (the number of optimizer steps done), holding

- ``model.safetensors``: the prepared model's ``state_dict`` with the keys of the plain module
  (no ``module.`` / ``_orig_mod.`` prefixes from DDP or ``torch.compile``, so a checkpoint loads
  whatever the number of processes or the compile setting); for a pre-training method that is
  student, teacher and loss centers; ``model_1.safetensors``... for further prepared models;
- ``optimizer.bin``, ``scaler.pt`` (fp16 only), ``random_states_<rank>.pkl`` (Python, numpy,
  torch CPU and CUDA generators of every process): written by ``accelerator.save_state``;
- ``custom_checkpoint_<i>.pkl``: the ``state_dict`` of each object registered with the
  :class:`Checkpointer` (the data source's position: epoch and batches consumed);
- ``trainer_state.json``: the loop's counters (``step``, ``epoch``, ...), written last;
- any further JSON documents the caller passes (the run's ``config.json``).

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step_...``, its files are flushed to
disk, and only then is the folder renamed to ``step_...`` (one ``rename``, atomic on a POSIX file
system). A run killed while saving leaves only a ``.tmp-`` folder, which is never loaded and is
removed by the next run. After each save the oldest checkpoints beyond ``keep_last`` are
deleted.

Resuming: ``latest`` (the highest step in a run's ``checkpoints/``), a checkpoint folder, or a
run folder. Checkpoints newer than the one resumed from belong to an abandoned continuation:
they are moved to ``checkpoints/superseded/`` so that ``latest`` never picks them again.

Reused by every loop (pre-training, fine-tuning): nothing here knows about a method.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.outputs import writing_failed

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
SUPERSEDED = "superseded"
_NAME = re.compile(r"^step_(\d{8,})$")
#: Words of torch's and safetensors' messages for a failed write (they wrap the OSError).
WRITE_FAILURE_WORDS = ("write", "No space left", "StorageFull", "os error", "IoError")
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def model_file(index: int) -> str:
    """File of the ``index``-th prepared model: ``model.safetensors``, ``model_1.safetensors``..."""
    return MODEL_FILE if index == 0 else MODEL_FILE.replace(".", f"_{index}.")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory`` (a run's ``checkpoints/``), oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(resume: str, run_dir: str | os.PathLike) -> Path:
    """The checkpoint folder ``--resume`` designates: ``latest`` (in ``run_dir``), a checkpoint
    folder, a run folder or a ``checkpoints/`` folder (its latest checkpoint)."""
    target = Path(run_dir) if resume == "latest" else Path(resume).expanduser()
    if (target / STATE_FILE).is_file():
        return target
    if not target.exists():
        raise UserError(f"no complete checkpoint in {target}: it does not exist")
    for folder in (target / CHECKPOINTS, target):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise UserError(f"no complete checkpoint in {target} (a checkpoint is a {CHECKPOINTS}/step_* "
                    f"folder holding {STATE_FILE})")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint file {path} is unreadable or corrupt: {err}") from None


def load_model_state(checkpoint: str | os.PathLike, index: int = 0) -> dict[str, torch.Tensor]:
    """The saved ``state_dict`` of the ``index``-th model of a checkpoint, on the CPU."""
    path = Path(checkpoint) / model_file(index)
    if not path.is_file():
        raise UserError(f"{checkpoint} is not a checkpoint: it has no {path.name}")
    try:
        return load_file(str(path), device="cpu")
    except _LOAD_ERRORS as err:
        raise UserError(f"checkpoint weights {path} are corrupt: {err}") from None


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk (before publishing it)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and restores the full training state of ``accelerator`` (module docstring).

    Args:
        accelerator: after ``prepare`` of the model(s) and optimizer(s).
        directory: where checkpoints go (a run's ``checkpoints/``).
        keep_last: complete checkpoints kept.
        objects: further stateful objects (``state_dict`` / ``load_state_dict``), e.g. the data
            source; registered with ``accelerator.register_for_checkpointing`` in this order.

    All processes must call :meth:`save` and :meth:`load` together.
    """

    def __init__(self, accelerator: Accelerator, directory: str | os.PathLike, keep_last: int,
                 objects: Sequence[Any] = ()) -> None:
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.num_objects = len(objects)
        if objects:
            accelerator.register_for_checkpointing(*objects)
        # accelerate's documented way to take over model saving: handle the weights in the
        # pre-hooks and remove them from the lists it would otherwise save / load itself.
        accelerator.register_save_state_pre_hook(self._save_models)
        accelerator.register_load_state_pre_hook(self._load_models)
        if accelerator.is_main_process and self.directory.is_dir():
            for leftover in self.directory.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # a save interrupted by a kill
        accelerator.wait_for_everyone()

    # --- accelerate hooks ----------------------------------------------------------------------
    def _save_models(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for i, model in enumerate(models):
                state = self.accelerator.unwrap_model(model).state_dict()
                tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
                save_file(tensors, str(Path(output_dir) / model_file(i)), metadata={"format": "pt"})
        weights.clear()

    def _load_models(self, models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_model_state(input_dir, i)
            self.accelerator.unwrap_model(model).load_state_dict(state, strict=True)
        models.clear()

    # --- save ----------------------------------------------------------------------------------
    def save(self, trainer_state: Mapping[str, Any], documents: Optional[Mapping[str, Any]] = None) -> Path:
        """Write a checkpoint named after ``trainer_state["step"]``; returns its folder.

        ``documents``: ``{file name: JSON-serializable value}`` written beside the state (e.g.
        ``{"config.json": config.to_dict()}``).
        """
        acc = self.accelerator
        name = checkpoint_name(int(trainer_state["step"]))
        final, tmp = self.directory / name, self.directory / f".tmp-{name}"
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            acc.wait_for_everyone()  # every process has written its random states
            if acc.is_main_process:
                for file_name, value in (documents or {}).items():
                    (tmp / file_name).write_text(json.dumps(value, indent=2) + "\n")
                (tmp / STATE_FILE).write_text(json.dumps(dict(trainer_state), indent=2) + "\n")
                _fsync_tree(tmp)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise self._write_failed(err, tmp, name) from None
        if acc.is_main_process:
            self._publish(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _write_failed(self, err: Exception, tmp: Path, name: str) -> Exception:
        """A failed write (a full disk: torch and safetensors wrap the OSError in their own
        errors) becomes one line saying the last good checkpoint is intact; the half-written
        folder is removed. Any other error is returned as it is."""
        text = str(err)
        if not isinstance(err, OSError) and not any(w in text for w in WRITE_FAILURE_WORDS):
            return err
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):
            code = errno.ENOSPC if "No space left" in text or "StorageFull" in text else None
            err = OSError(code, os.strerror(code) if code else text.strip().splitlines()[-1])
        done = list_checkpoints(self.directory)
        keep = (f"the last good checkpoint {done[-1]} is intact: free space and continue with --resume"
                if done else "no earlier checkpoint of this run exists")
        return writing_failed(err, f"checkpoint {name} in {self.directory}", keep)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished ``tmp`` folder to ``final`` (replacing a checkpoint of the same step)."""
        old = None
        if final.exists():
            old = final.with_name(f".tmp-old-{final.name}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        for stale in list_checkpoints(self.directory)[: -self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)

    # --- load ----------------------------------------------------------------------------------
    def load(self, checkpoint: str | os.PathLike) -> dict[str, Any]:
        """Restore everything saved in ``checkpoint``; returns its ``trainer_state``.

        A missing or corrupt file is a :class:`UserError` naming the checkpoint. Checkpoints of
        this run newer than ``checkpoint`` are moved to ``superseded/`` (module docstring).
        """
        acc = self.accelerator
        checkpoint = Path(checkpoint)
        self._check_complete(checkpoint)
        state = read_json(checkpoint / STATE_FILE)
        try:
            acc.load_state(str(checkpoint))
        except _LOAD_ERRORS as err:
            raise UserError(f"checkpoint {checkpoint} cannot be loaded ({type(err).__name__}: {err}); "
                            "resume from an earlier one with --resume PATH") from None
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._set_aside_newer_than(int(state["step"]), checkpoint)
        acc.wait_for_everyone()
        return state

    def _check_complete(self, checkpoint: Path) -> None:
        needed = [STATE_FILE, MODEL_FILE, "optimizer.bin"]
        needed += [f"custom_checkpoint_{i}.pkl" for i in range(self.num_objects)]
        missing = [n for n in needed if not (checkpoint / n).is_file()]
        if missing:
            raise UserError(f"checkpoint {checkpoint} is incomplete: {', '.join(missing)} missing")
        rng = checkpoint / f"random_states_{self.accelerator.process_index}.pkl"
        if not rng.is_file():
            warnings.warn(f"{checkpoint} has no random state for process {self.accelerator.process_index} "
                          "(saved with fewer processes): its random streams start afresh", stacklevel=3)

    def _set_aside_newer_than(self, step: int, resumed: Path) -> None:
        newer = [p for p in list_checkpoints(self.directory)
                 if int(_NAME.match(p.name).group(1)) > step and p.resolve() != resumed.resolve()]
        if newer:
            aside = self.directory / SUPERSEDED
            aside.mkdir(exist_ok=True)
            for path in newer:
                target = aside / path.name
                shutil.rmtree(target, ignore_errors=True)
                os.rename(path, target)
            warnings.warn(f"resumed from step {step}: moved {len(newer)} newer checkpoint(s) to {aside}",
                          stacklevel=3)


__all__ = [
    "CHECKPOINTS",
    "Checkpointer",
    "MODEL_FILE",
    "STATE_FILE",
    "checkpoint_name",
    "list_checkpoints",
    "load_model_state",
    "read_json",
    "resolve_checkpoint",
]
