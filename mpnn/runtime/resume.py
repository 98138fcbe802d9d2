"""Resuming a run from a checkpoint: verified against this run, loaded into this stage.

    load_resume(config, model)   the checkpoint to start from (``--resume``), checked
                                 and loaded into this rank's layers; a Resume or None
    compare_config               settings that must match, and those that only warn
    check_branch                 a resume never mixes two runs' checkpoints in one directory

A resume continues a run in its own directory (``--resume``: the newest
checkpoint there), or branches from a chosen file: then the directory must
hold no checkpoint after that file's step (they belong to the abandoned
branch and keep-K pruning would mix the two), and a file from elsewhere
starts an empty directory, like a new run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..nn.params import Layout
from .checkpoint import (
    LOOSE,
    STRICT,
    Checkpoint,
    CheckpointError,
    config_of,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)


def optimizer_state_names(optim):
    """The state a configured optimizer keeps (``OptimConfig``): Adam m and v, SGD's
    velocity when it has momentum, nothing for plain SGD."""
    if optim.optimizer == "adam":
        return {"m", "v"}
    return {"velocity"} if optim.momentum else set()


def check_branch(directory, path, step):
    """CheckpointError when resuming ``path`` (at ``step``) into ``directory`` would
    mix two runs' checkpoints there."""
    others = [p for p in list_checkpoints(directory)
              if os.path.abspath(p) != os.path.abspath(path)]
    inside = os.path.dirname(os.path.abspath(path)) == os.path.abspath(directory)
    later = [p for p in others if int(os.path.basename(p)[5:14]) > step] if inside else others
    if later:
        what = (f"{len(later)} checkpoint(s) after step {step} (newest "
                f"{os.path.basename(later[-1])}) of the run that went on from there" if inside
                else f"{len(later)} checkpoint(s) of another run (newest "
                     f"{os.path.basename(later[-1])})")
        raise CheckpointError(f"--checkpoint-dir {directory} holds {what}: resuming {path} "
                              f"there would mix two runs' checkpoints; give this run a new "
                              f"--checkpoint-dir, or remove those files")


def _flag(name):
    return "--" + name.replace("_", "-")


def compare_config(saved, current, path):
    """CheckpointError for a different architecture, loss, optimizer, dtype or data;
    the list of other settings that differ (the resumed run then is not exact)."""
    def show(name, value):
        if name == "sizes":
            return "-".join(map(str, value))
        return "default" if value is None else str(value)

    strict = [n for n in STRICT if saved.get(n) != current[n]]
    if strict:
        diffs = "; ".join(f"{'layer sizes' if n == 'sizes' else _flag(n)} "
                          f"{show(n, saved.get(n))} in the checkpoint, "
                          f"{show(n, current[n])} in this run" for n in strict)
        kind = "a different architecture" if {"sizes", "activation"} & set(strict) \
            else "a different configuration"
        raise CheckpointError(f"checkpoint {path}: saved for {kind}: {diffs}. Resume with the "
                              f"options it was saved with, or start a new run from its weights "
                              f"with --init")
    return [f"{_flag(n)} {show(n, saved.get(n))} -> {show(n, current[n])}"
            for n in LOOSE if saved.get(n) != current[n]]


def _chunk_spans(layout):
    """For each chunk of this rank's ``layout``: ((start, stop) in the whole model's
    flat layout, (start, stop) in this rank's)."""
    full = Layout(layout.sizes)
    return [((full.layer_span(c.start)[0], full.layer_span(c.stop - 1)[1]),
             layout.chunk_span(k)) for k, c in enumerate(layout.chunks)]


@dataclass
class Resume:
    """Where a resumed run starts: the loaded checkpoint and its position."""

    checkpoint: Checkpoint
    warnings: list

    @property
    def path(self):
        return self.checkpoint.path

    @property
    def step(self):
        return self.checkpoint.meta["step"]

    @property
    def epoch(self):
        return self.checkpoint.meta["epoch"]

    @property
    def batch(self):
        return self.checkpoint.meta["batch"]

    @property
    def epoch_loss_sum(self):
        return self.checkpoint.meta["epoch_loss_sum"]

    def restore_optimizer(self, opt, model):
        """Copy this stage's slice of the saved optimizer state into ``opt``."""
        state = opt.state()
        saved = self.checkpoint.optim
        if set(state) != set(saved):
            raise CheckpointError(
                f"checkpoint {self.path}: optimizer state {sorted(saved) or 'none'}, but this "
                f"run's optimizer keeps {sorted(state) or 'none'} (--momentum 0 keeps none)")
        for name, arr in state.items():
            stage = np.empty(model.whole_layout.numel, arr.dtype)  # this rank's layers, whole
            for (lo, hi), (a, b) in _chunk_spans(model.whole_layout):  # a span per chunk
                stage[a:b] = saved[name][lo:hi]
            opt.load_state(name, model.local_of(stage))  # its shards under --tp or --zero
        opt.t = int(self.checkpoint.meta["optimizer_t"])

    def release(self):
        """Drop the checkpoint's arrays once they are loaded (the whole model's
        parameters and optimizer state would otherwise stay on every rank for the
        whole run, outside the memory ledger); its position and meta stay."""
        self.checkpoint.params.clear()
        self.checkpoint.optim.clear()


def load_resume(config, model):
    """The checkpoint to resume from, verified against this run and loaded into
    ``model`` (this stage's layers); None when there is nothing to resume.

    Called on every rank before the first collective, so a refused file ends
    the job with one message."""
    cfg = config.checkpoint
    if not cfg.resume:
        return None
    path = latest_checkpoint(cfg.directory) if cfg.resume == "latest" else cfg.resume
    if path is None:
        return None
    ckpt = read_checkpoint(path)
    warnings = compare_config(ckpt.config, config_of(config, model.sizes), path)
    expected = optimizer_state_names(config.optim)
    if set(ckpt.optim) != expected:
        raise CheckpointError(
            f"checkpoint {path}: optimizer state {sorted(ckpt.optim) or 'none'}, but this run's "
            f"optimizer keeps {sorted(expected) or 'none'} (SGD with --momentum 0 keeps none): "
            f"resume with the --optimizer/--momentum it was saved with, or start a new run "
            f"from its weights with --init")
    if cfg.directory:
        check_branch(cfg.directory, path, ckpt.meta["step"])
    full = Layout(model.sizes)
    for name, slot in full.slots.items():
        if name not in ckpt.params or ckpt.params[name].shape != slot.shape:
            raise CheckpointError(f"checkpoint {path}: {name} missing or of the wrong shape "
                                  f"for layer sizes {'-'.join(map(str, model.sizes))}")
    for name, arr in ckpt.optim.items():
        if arr.shape != (full.numel,):
            raise CheckpointError(f"checkpoint {path}: optimizer state {name} has shape "
                                  f"{arr.shape}, expected ({full.numel},)")
    model.load_state_dict(ckpt.params, source=f"checkpoint {path}")
    return Resume(ckpt, warnings)
