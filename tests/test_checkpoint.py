"""Checkpoints without MPI: format, verification, atomic writes, exact resume, guards."""

import argparse
import errno
import json
import os

import numpy as np
import pytest

from mpnn.nn.model import MLP
from mpnn.runtime import checkpoint as ck
from mpnn.runtime import files, guards
from mpnn.runtime.checkpoint import CheckpointError
from mpnn.runtime.config import Every
from mpnn.runtime.guards import NonFiniteError
from mpnn.runtime.weights import load_weights
from mpnn.train import main, parse_every

BASE = ["--dataset", "digits", "--hidden", "24,16", "--epochs", "2", "--batch-size", "100",
        "--dtype", "float64", "--quiet"]
OPTIMIZERS = {
    "adam": ["--optimizer", "adam", "--lr", "0.003", "--weight-decay", "0.01"],
    "nesterov": ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "--lr", "0.05"],
    "sgd": ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.2"],
}


def run(tmp_path, *argv):
    assert main([*BASE, *argv]) == 0


def weights_equal(a, b):
    wa, wb = load_weights(a), load_weights(b)  # a checkpoint also holds optim.*, meta, sha256
    names = [k for k in wb if k.startswith("layers.")]
    assert names and all(k in wa for k in names)
    return max(float(np.max(np.abs(wa[k] - wb[k]))) for k in names)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("text, every", [("200", Every(200, "steps")), ("7s", Every(7, "steps")),
                                         ("3steps", Every(3, "steps")), ("1e", Every(1, "epochs")),
                                         ("2epochs", Every(2, "epochs"))])
def test_every_syntax(text, every):
    assert parse_every(text) == every


@pytest.mark.parametrize("text", ["0", "-1", "x", "1.5", "2h", ""])
def test_every_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="positive number of steps"):
        parse_every(text)


# ------------------------------------------------------------- file format


def saved(tmp_path, *extra):
    d = tmp_path / "ck"
    run(tmp_path, *OPTIMIZERS["adam"], "--checkpoint-dir", str(d), "--checkpoint-every", "5",
        "--checkpoint-keep", "0", *extra)
    return d


def test_checkpoint_holds_model_optimizer_position_and_config(tmp_path):
    d = saved(tmp_path, "--save", str(tmp_path / "w.npz"))
    names = sorted(os.listdir(d))
    # 15 steps per epoch: 5, 10 mid-epoch; 15 at the epoch's end; 20, 25; 30 the end of epoch 2
    assert names == [f"ckpt-{s:09d}.npz" for s in (5, 10, 15, 20, 25, 30)]
    c = ck.read_checkpoint(str(d / "ckpt-000000010.npz"))
    meta = c.meta
    assert (meta["step"], meta["epoch"], meta["batch"], meta["optimizer_t"]) == (10, 1, 10, 10)
    # next epoch, batch 0
    assert ck.read_checkpoint(str(d / "ckpt-000000015.npz")).meta["epoch"] == 2
    assert c.config["sizes"] == [64, 24, 16, 10] and c.config["optimizer"] == "adam"
    assert sorted(c.optim) == ["m", "v"]
    assert c.optim["m"].shape == (64 * 24 + 24 + 24 * 16 + 16 + 16 * 10 + 10,)
    with np.load(d / "ckpt-000000010.npz", allow_pickle=False) as z:  # plain arrays only
        assert {"meta", "sha256", "layers.0.weight", "optim.m"} <= set(z.files)
    # the final checkpoint's weights are the --save file's; --init reads a checkpoint too
    assert weights_equal(d / "ckpt-000000030.npz", tmp_path / "w.npz") == 0


def test_newest_complete_checkpoint_is_found_and_temporaries_ignored(tmp_path):
    d = saved(tmp_path)
    (d / ".ckpt-000000099.npz.123.tmp").write_bytes(b"partial")
    (d / "ckpt-notes.txt").write_text("x")
    assert ck.latest_checkpoint(str(d)) == str(d / "ckpt-000000030.npz")
    assert ck.latest_checkpoint(str(tmp_path / "nowhere")) is None


def test_keep_removes_older_checkpoints(tmp_path):
    d = tmp_path / "ck"
    run(tmp_path, "--checkpoint-dir", str(d), "--checkpoint-every", "5", "--checkpoint-keep", "2")
    assert sorted(os.listdir(d)) == ["ckpt-000000025.npz", "ckpt-000000030.npz"]


def corrupt(path, how):
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "flipped":  # one byte inside the stored weights: zip CRC or checksum catches it
        raw[len(raw) // 3] ^= 0xFF
        path.write_bytes(raw)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not-npz":
        path.write_text("hello")


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "not-npz"])
def test_corrupt_checkpoint_is_refused_naming_file(tmp_path, how):
    d = saved(tmp_path)
    path = d / "ckpt-000000030.npz"
    corrupt(path, how)
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(str(path))
    assert str(path) in str(e.value)
    assert ("unreadable" in str(e.value)) or ("checksum mismatch" in str(e.value))


def test_checksum_catches_a_consistent_zip_with_changed_contents(tmp_path):
    d = saved(tmp_path)
    path = d / "ckpt-000000030.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["layers.0.bias"] = arrays["layers.0.bias"] + 1e-9  # valid zip, wrong contents
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ck.read_checkpoint(str(path))


def test_weights_file_and_pickles_are_not_checkpoints(tmp_path):
    w = tmp_path / "w.npz"
    run(tmp_path, "--save", str(w))
    with pytest.raises(CheckpointError, match="not an mpnn checkpoint"):
        ck.read_checkpoint(str(w))
    evil = tmp_path / "evil.npz"
    np.savez(evil, meta=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="refused|unreadable"):
        ck.read_checkpoint(str(evil))


def valid_meta(step):
    """A complete meta entry (read_checkpoint verifies every field)."""
    config = {k: None for k in ck.STRICT + ck.LOOSE}
    return {"step": step, "epoch": 1, "batch": step, "optimizer_t": step,
            "epoch_loss_sum": 0.0, "config": config}


def test_failed_write_leaves_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    d.mkdir()
    good = d / "ckpt-000000005.npz"
    ck.write_checkpoint(str(good), {"a": np.ones(3)}, {}, valid_meta(5))

    def full_disk(f, **arrays):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ck.write_checkpoint(str(d / "ckpt-000000010.npz"), {"a": np.ones(3)}, {}, valid_meta(10))
    assert sorted(os.listdir(d)) == ["ckpt-000000005.npz"]
    assert ck.read_checkpoint(str(good)).meta["step"] == 5


def test_full_disk_during_training_is_a_clear_error(tmp_path, monkeypatch, capsys):
    real = np.savez

    def savez(f, **arrays):
        if json.loads(arrays["meta"].tobytes())["step"] >= 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, **arrays)

    monkeypatch.setattr(ck.np, "savez", savez)
    d = tmp_path / "ck"
    assert main([*BASE, "--checkpoint-dir", str(d), "--checkpoint-every", "5"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write checkpoint {d / 'ckpt-000000010.npz'}: No space left on device" in err
    assert f"the previous checkpoint {d / 'ckpt-000000005.npz'} is intact" in err
    assert os.listdir(d) == ["ckpt-000000005.npz"]


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("at", [7, 15, 22])  # mid-epoch 1, the epoch boundary, mid-epoch 2
def test_resume_repeats_the_uninterrupted_run_bitwise(tmp_path, optimizer, at):
    full, resumed = tmp_path / "full.npz", tmp_path / "resumed.npz"
    opt = OPTIMIZERS[optimizer]
    run(tmp_path, *opt, "--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "1",
        "--checkpoint-keep", "0", "--save", str(full), "--metrics", str(tmp_path / "full.jsonl"))
    start = tmp_path / "a" / f"ckpt-{at:09d}.npz"
    metrics = tmp_path / "resumed.jsonl"
    metrics.write_text((tmp_path / "full.jsonl").read_text())  # the interrupted run's lines
    run(tmp_path, *opt, "--checkpoint-dir", str(tmp_path / "b"), "--resume", str(start),
        "--save", str(resumed), "--metrics", str(metrics))
    assert weights_equal(full, resumed) == 0.0
    lines = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    a, b = lines(tmp_path / "full.jsonl"), lines(metrics)
    assert [r["epoch"] for r in b] == [1, 2]
    # the resumed epoch's loss includes the batches before the stop
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-12)
        assert rb["test_accuracy"] == ra["test_accuracy"]


def test_resume_latest_in_directory_and_nothing_to_resume(tmp_path, capsys):
    d = tmp_path / "ck"
    assert main([*BASE, "--epochs", "1", "--checkpoint-dir", str(d), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    # a second call with --epochs 2 continues from the epoch-1 checkpoint
    loud = [a for a in BASE if a != "--quiet"]
    assert main([*loud, "--checkpoint-dir", str(d), "--resume",
                 "--save", str(tmp_path / "r.npz")]) == 0
    out = capsys.readouterr()
    assert f"resuming from {d / 'ckpt-000000015.npz'} (step 15, epoch 2" in out.out
    assert "--epochs 1 -> 2" in out.err  # a different setting is named, not hidden


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "32,16"], "saved for a different architecture: layer sizes 64-24-16-10 in the "
                            "checkpoint, 64-32-16-10 in this run"),
    (["--activation", "tanh"], "--activation relu in the checkpoint, tanh in this run"),
    (["--optimizer", "sgd"], "--optimizer adam in the checkpoint, sgd in this run"),
    (["--dtype", "float32"], "--dtype float64 in the checkpoint, float32 in this run"),
])
def test_mismatched_checkpoint_is_refused(tmp_path, capsys, argv, message):
    d = saved(tmp_path)
    capsys.readouterr()
    assert main([*BASE, *OPTIMIZERS["adam"], *argv, "--checkpoint-dir", str(d), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {d / 'ckpt-000000030.npz'}: " in err and message in err, err


def test_corrupt_checkpoint_stops_resume_with_exit_2(tmp_path, capsys):
    d = saved(tmp_path)
    corrupt(d / "ckpt-000000030.npz", "truncated")
    capsys.readouterr()
    assert main([*BASE, *OPTIMIZERS["adam"], "--checkpoint-dir", str(d), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {d / 'ckpt-000000030.npz'}: unreadable, truncated" in err


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    (["--resume"], "--resume without a FILE needs --checkpoint-dir"),
    (["--resume", "/nonexistent.npz"], "--resume /nonexistent.npz: no such file"),
    (["--checkpoint-dir", "/proc/mpnn-ck"], "--checkpoint-dir /proc/mpnn-ck: cannot write there"),
])
def test_checkpoint_option_errors(argv, message, capsys):
    assert main([*BASE, *argv]) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_dir_under_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main([*BASE, "--checkpoint-dir", str(f / "ck")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint-dir {f / 'ck'}: cannot write there (Not a directory)" in err


# ------------------------------------------------------------------ guards


def model_with_grads():
    m = MLP([4, 3, 3, 2], dtype=np.float64, seed=0)
    m.flat.grad[...] = 0.1
    return m


def test_finite_state_passes():
    guards.check_finite(model_with_grads(), 1.5, 3, 1, 3)


def test_nan_gradient_names_step_and_layer():
    m = model_with_grads()
    m.flat.grads["layers.1.weight"][0, 0] = np.nan
    m.flat.data[...] += m.flat.grad  # the update carries it into the parameters
    with pytest.raises(NonFiniteError) as e:
        guards.check_finite(m, 1.5, 42, 3, 7, rank=2, last_checkpoint="ck/ckpt-000000040.npz")
    msg = str(e.value)
    assert ("non-finite gradient at step 42 (epoch 3, batch 7) on rank 2: "
            "first in layers.1.weight") in msg
    assert "the last good checkpoint ck/ckpt-000000040.npz was not overwritten" in msg


def test_inf_gradient_in_two_layers_names_the_one_backward_reaches_first():
    m = model_with_grads()
    m.flat.grads["layers.0.bias"][1] = np.inf
    m.flat.grads["layers.2.weight"][1, 1] = -np.inf
    m.flat.data[...] += m.flat.grad
    with pytest.raises(NonFiniteError, match=r"first in layers.2.weight \(also layers.0.bias\)"):
        guards.check_finite(m, 0.0, 1, 1, 1)


def test_nan_loss_names_the_first_layer_with_non_finite_output():
    m = model_with_grads()
    outputs = {0: np.ones((2, 3)), 1: np.array([[np.inf, 0, 0], [0, 0, 0]]),
               2: np.full((2, 2), np.nan)}
    with pytest.raises(NonFiniteError, match="training loss is nan at step 5 .* output of layer 1"):
        guards.check_finite(m, float("nan"), 5, 1, 5, activations=outputs)


def test_overflowed_update_is_named():
    m = model_with_grads()
    m.flat.params["layers.0.weight"][0, 0] = np.inf
    with pytest.raises(NonFiniteError,
                       match="non-finite parameters after the optimizer step .*layers.0.weight"):
        guards.check_finite(m, 1.0, 9, 1, 9)


def test_diverging_run_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    d = tmp_path / "ck"
    argv = ["--dataset", "digits", "--hidden", "32,16", "--epochs", "3", "--optimizer", "sgd",
            "--lr", "1e30", "--lr-schedule", "constant", "--quiet", "--checkpoint-dir", str(d),
            "--checkpoint-every", "1"]
    with np.errstate(all="ignore"):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "NonFiniteError: training loss is nan at step 2 (epoch 1, batch 2) on rank 0" in err
    assert f"the last good checkpoint {d / 'ckpt-000000001.npz'} was not overwritten" in err
    assert os.listdir(d) == ["ckpt-000000001.npz"]
    c = ck.read_checkpoint(str(d / "ckpt-000000001.npz"))
    assert all(np.isfinite(v).all() for v in c.params.values())


def test_keep_metrics_truncates_to_past_epochs(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
    files.keep_metrics(str(p), 2)
    assert [json.loads(x)["epoch"] for x in p.read_text().splitlines()] == [1, 2]
    files.keep_metrics(str(p), 0)
    assert p.read_text() == ""
