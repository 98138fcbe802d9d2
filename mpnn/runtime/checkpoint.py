"""Resumable checkpoints: the whole training state in one .npz, on any process grid.

    python -m mpnn.train --checkpoint-dir ck --checkpoint-every 200      # every 200 steps
    python -m mpnn.train --checkpoint-dir ck --checkpoint-every 1e       # every epoch
    python -m mpnn.train --checkpoint-dir ck --resume                    # newest in ck/
    python -m mpnn.train --resume ck/ckpt-000000400.npz                  # that one

A checkpoint ``DIR/ckpt-<step, 9 digits>.npz`` holds plain arrays only (it is
read with ``allow_pickle=False``)::

    layers.{i}.weight, layers.{i}.bias   the whole model, as a --save file (so --init reads it)
    optim.{name}                         optimizer state (Adam m, v; SGD velocity): flat
                                         arrays in the whole model's parameter layout
    meta                                 JSON as uint8: step, epoch, batches done in that
                                         epoch, optimizer step count t, the epoch's loss so
                                         far, and the run's configuration
    sha256                               hex digest (uint8) of every other entry

It does not depend on the grid it was saved from. Pipeline stages send their
flat buffers (parameters and optimizer state share one layout) to the first
stage of replica 0 (world rank 0), which writes the file; on resume every rank
reads it and keeps the contiguous slice of its own layers, so a run saved at
``--dp 2 --pp 2`` resumes at ``--pp 4``, at ``-n 1`` or at ``--dp 4``. The data
order is a pure function of (seed, epoch) (``data.batching``), so the epoch
and the number of batches done in it restore it exactly; the step restores the
learning-rate schedule. Resuming therefore repeats the uninterrupted run:
bitwise on the same grid, up to summation order on another.

Files are written to a hidden temporary name in the same directory, flushed,
fsynced and renamed (then the directory is fsynced), so a crash leaves either
the previous checkpoint or the new one, never a partial file under the final
name; temporary files are ignored on resume. A file that fails to read, fails
its checksum, or was saved for another architecture is refused with a message
naming the file and the reason. The checkpoint directory must be visible to
every rank (as the data files are).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from ..nn.params import Layout
from ..parallel.gather import gather_whole
from .files import atomic_write, remove_stale_temps
from .lock import LockError, take_lock

FORMAT, VERSION = "mpnn-checkpoint", 1
NAME = re.compile(r"^ckpt-(\d{9})\.npz$")
MAX_STEP = 10**9 - 1  # the names hold 9 digits
# settings whose change makes the saved state meaningless for this run
STRICT = ("sizes", "activation", "loss", "optimizer", "dtype", "dataset")
# settings whose change only makes the resumed run differ from the uninterrupted one
LOOSE = ("lr", "lr_schedule", "momentum", "nesterov", "weight_decay", "batch_size", "epochs",
         "seed")


class CheckpointError(ValueError):
    """A checkpoint option, file or directory that cannot be used; says which and why."""


# ------------------------------------------------------------ the directory


def check_checkpoint_config(cfg, init=None):
    """Raise CheckpointError for checkpoint options that cannot work (looks only).

    cfg: a ``CheckpointConfig``; init: the run's ``--init`` file, if any."""
    if cfg.every is not None and not cfg.directory:
        raise CheckpointError("--checkpoint-every needs --checkpoint-dir DIR")
    if cfg.keep < 0:
        raise CheckpointError(f"--checkpoint-keep must be >= 0, got {cfg.keep}")
    if cfg.resume == "latest" and not cfg.directory:
        raise CheckpointError("--resume without a FILE needs --checkpoint-dir DIR "
                              "(the newest checkpoint there is used)")
    if cfg.resume and init:
        raise CheckpointError("--resume and --init both set the starting weights; use one")
    for option, value in (("--checkpoint-dir", cfg.directory), ("--resume", cfg.resume)):
        if value == "":
            what = "directory" if option == "--checkpoint-dir" else "file"
            raise CheckpointError(f"{option} '': give a {what}")
    if cfg.resume and cfg.resume != "latest" and not os.path.isfile(cfg.resume):
        raise CheckpointError(f"--resume {cfg.resume}: no such file")


def prepare_checkpoint_dir(cfg, lock=True):
    """Create the checkpoint directory and prove it writable before any training,
    take its lock (``runtime.lock``: one run per directory) and remove the
    temporary files of writers that were killed; a new run (no ``--resume``)
    refuses a directory that already holds checkpoints. Returns the lock (None
    without a directory, or with ``lock=False``: ranks other than 0)."""
    if not cfg.directory:
        return None
    d = cfg.directory
    try:
        os.makedirs(d, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):  # a real write: os.access says yes to root
            pass
    except OSError as e:
        raise CheckpointError(f"--checkpoint-dir {d}: cannot write there "
                              f"({e.strerror or e})") from None
    taken = None
    if lock:
        try:
            taken = take_lock(d)
        except LockError as e:
            raise CheckpointError(str(e)) from None
    earlier = list_checkpoints(d)
    if earlier and not cfg.resume:  # a new run there would prune its own files by step
        if taken is not None:
            taken.release()
        raise CheckpointError(
            f"--checkpoint-dir {d} already holds {len(earlier)} checkpoint(s) of an earlier "
            f"run (newest {os.path.basename(earlier[-1])}): add --resume to continue that "
            f"run, or give a new run an empty directory")
    if taken is not None:
        taken.removed = remove_stale_temps(d)  # (the lock rules out a live writer here)
    return taken


# ------------------------------------------------------------ file format


def config_of(config, sizes):
    """The run's configuration (a ``RunConfig``) as stored in (and compared with) a checkpoint."""
    m, o = config.model, config.optim
    return {"sizes": [int(s) for s in sizes], "activation": m.activation, "loss": m.loss,
            "optimizer": o.optimizer, "dtype": m.dtype, "dataset": config.data.dataset,
            "lr": o.lr, "lr_schedule": o.lr_schedule, "momentum": o.momentum,
            "nesterov": o.nesterov, "weight_decay": o.weight_decay,
            "batch_size": config.batch_size, "epochs": config.epochs, "seed": config.seed}


def _digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _text(s):
    return np.frombuffer(s.encode(), dtype=np.uint8)


def checkpoint_path(directory, step):
    return os.path.join(directory, f"ckpt-{int(step):09d}.npz")


def list_checkpoints(directory):
    """Complete checkpoints in ``directory``, oldest first (temporary files ignored)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted((int(m.group(1)), n) for n in names if (m := NAME.match(n)))
    return [os.path.join(directory, n) for _, n in found]


def latest_checkpoint(directory):
    found = list_checkpoints(directory)
    return found[-1] if found else None


def write_checkpoint(path, params, optim, meta):
    """Write one checkpoint file atomically.

    params  named whole-model tensors (``layers.{i}.weight`` ...)
    optim   optimizer state name -> flat array over the whole model's layout
    meta    JSON-able dict
    """
    arrays = dict(params)
    arrays.update({f"optim.{k}": v for k, v in optim.items()})
    arrays["meta"] = _text(json.dumps({"format": FORMAT, "version": VERSION, **meta},
                                      sort_keys=True))
    arrays["sha256"] = _text(_digest(arrays))
    atomic_write(path, lambda f: np.savez(f, **arrays))


@dataclass
class Checkpoint:
    """A verified checkpoint file's contents (host arrays)."""

    path: str
    params: dict  # layers.{i}.weight / bias of the whole model
    optim: dict  # state name -> flat whole-model array
    meta: dict

    @property
    def config(self):
        return self.meta["config"]


def read_checkpoint(path):
    """Read and verify a checkpoint (never unpickles). Raises CheckpointError."""
    def refuse(why):
        return CheckpointError(f"checkpoint {path}: {why}")

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror or e})") from None
    if head != b"PK\x03\x04":  # every .npz is a zip archive
        raise refuse(f"unreadable, truncated or not an .npz (it starts with {head!r}, not a zip "
                     f"header); delete it to resume from an older checkpoint")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except ValueError as e:  # object arrays: a pickle inside
        raise refuse(f"refused: holds pickled objects ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad CRC, not an npz at all
        raise refuse(f"unreadable, truncated or not an .npz ({type(e).__name__}: {e}); "
                     f"delete it to resume from an older checkpoint") from None
    if "meta" not in arrays or "sha256" not in arrays:
        raise refuse("not an mpnn checkpoint (no meta/sha256 entries; a --save weights "
                     "file can start a run with --init)")
    stored = arrays.pop("sha256").tobytes().decode(errors="replace")
    actual = _digest(arrays)
    if stored != actual:
        raise refuse(f"checksum mismatch (stored sha256 {stored[:12]}..., contents "
                     f"{actual[:12]}...): the file is corrupt; delete it to resume from an "
                     f"older checkpoint")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except ValueError as e:
        raise refuse(f"unreadable meta entry ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise refuse(f"format {meta.get('format')!r} version {meta.get('version')!r}, "
                     f"this mpnn reads {FORMAT!r} version {VERSION}")
    problem = _meta_problem(meta)
    if problem:
        raise refuse(f"{problem}; the file was not written by mpnn (or by another version): "
                     f"resume from another checkpoint")
    optim = {k[len("optim."):]: v for k, v in arrays.items() if k.startswith("optim.")}
    params = {k: v for k, v in arrays.items() if not k.startswith("optim.")}
    return Checkpoint(path, params, optim, meta)


def _meta_problem(meta):
    """What is wrong with a checkpoint's meta entry, or None."""
    def whole(name, low):
        v = meta.get(name)
        return isinstance(v, int) and not isinstance(v, bool) and low <= v
    checks = [("step", whole("step", 0) and meta["step"] <= MAX_STEP,
               f"an integer from 0 to {MAX_STEP}"),
              ("epoch", whole("epoch", 1), "an integer >= 1"),
              ("batch", whole("batch", 0), "an integer >= 0"),
              ("optimizer_t", whole("optimizer_t", 0), "an integer >= 0"),
              ("epoch_loss_sum", isinstance(meta.get("epoch_loss_sum"), (int, float))
               and math.isfinite(meta["epoch_loss_sum"]), "a finite number"),
              ("config", isinstance(meta.get("config"), dict)
               and all(k in meta["config"] for k in STRICT + LOOSE), "the run's settings")]
    for name, ok, expected in checks:
        if not ok:
            got = "missing" if name not in meta else f"{meta[name]!r}"
            return f"meta.{name} is {got}, expected {expected}"
    return None


# ------------------------------------------------------------- save, resume


def _sum_loss(comm, value):
    """The float64 sum of ``value`` over ``comm`` (a world of one: unchanged)."""
    from mpi4py import MPI

    buf = np.array([value], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return float(buf[0])


def _host(ops, a):
    return np.ascontiguousarray(ops.to_host(a))


class Checkpointer:
    """Writes the checkpoints of one run (every rank builds one; rank 0 writes).

    ``save`` is collective over every rank of the job: the epoch loss is summed
    over ``comm``, the stages of replica 0 send their buffers to its first stage.
    """

    def __init__(self, config, sizes, grid):
        """config: the run's ``RunConfig``; sizes: the whole model's layer sizes;
        grid: the process grid (``grid.world`` is every rank of the job)."""
        self.directory = config.checkpoint.directory
        self.every = config.checkpoint.interval
        self.keep = config.checkpoint.keep
        self.config = config_of(config, sizes)
        self.comm, self.grid = grid.world, grid
        self.rank = grid.world.Get_rank()
        self.zero = config.parallel.zero
        self.last_saved = None  # (path, step) of the newest checkpoint written by this run

    @property
    def enabled(self):
        return self.directory is not None

    def due_after_step(self, step):
        return self.enabled and self.every.unit == "steps" and step % self.every.n == 0

    def due_after_epoch(self, epoch):
        return self.enabled and self.every.unit == "epochs" and epoch % self.every.n == 0

    def save(self, model, opt, step, epoch, batch, loss_sum):
        """Checkpoint after ``step`` optimizer steps, ``batch`` batches into ``epoch``
        (``batch`` 0: ``epoch`` not started). ``loss_sum``: this rank's share of
        the epoch's training loss so far. Returns the path on rank 0, else None."""
        total_loss = _sum_loss(self.comm, loss_sum)
        params, optim = self._gather(model, opt)
        meta = {"step": int(step), "epoch": int(epoch), "batch": int(batch),
                "optimizer_t": int(opt.t), "epoch_loss_sum": total_loss, "config": self.config,
                "grid": {"dp": self.grid.dp, "pp": self.grid.pp, "tp": self.grid.tp,
                         "zero": self.zero}}
        if step > MAX_STEP:
            raise CheckpointError(f"step {step}: checkpoint names hold 9 digits, so steps end at "
                                  f"{MAX_STEP}; checkpoint less often (--checkpoint-every)")
        path = checkpoint_path(self.directory, step)
        if self.rank != 0:
            self.last_saved = path
            return None
        try:
            write_checkpoint(path, Layout(model.sizes).views(params), optim, meta)
        except OSError as e:
            prev = f"the previous checkpoint {self.last_saved} is intact" if self.last_saved \
                else "no earlier checkpoint was written by this run"
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e} ({prev})") \
                from None
        self.last_saved = path
        if self.keep:
            for old in list_checkpoints(self.directory)[:-self.keep]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
        return path

    def _gather(self, model, opt):
        """Whole-model flat parameters and optimizer state on world rank 0 (host
        arrays, via ``parallel.gather.gather_whole``: parameters and optimizer state
        share one layout); (None, None) on every other rank."""
        ops = model.ops
        ops.synchronize()
        local = opt.stage_arrays()  # under ZeRO gathered over the replicas first
        if local is None:  # a ZeRO rank other than its stage's first: nothing to send
            return None, None
        stage = model.whole_stage({name: _host(ops, a) for name, a in local.items()})
        whole = gather_whole(self.grid, stage, model.whole_layout)  # tp shards put together
        if whole is None:
            return None, None
        return whole.pop("params"), whole
