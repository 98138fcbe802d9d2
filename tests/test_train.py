"""The training CLI's contracts: --save/--init format, --metrics lines, plain SGD,
accuracy on digits, and clear errors (also under mpirun)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpnn.nn.model import MLP, Context
from mpnn.runtime.loop import train
from mpnn.runtime.weights import load_weights
from mpnn.train import main

from conftest import build_run, run_training, train_cli

FAST = ["--dataset", "digits", "--hidden", "16", "--epochs", "1", "--quiet"]


def test_save_writes_named_layers_and_init_reads_them(tmp_path):
    path = tmp_path / "w.npz"
    assert main(FAST + ["--hidden", "32,16", "--save", str(path)]) == 0
    w = load_weights(path)
    assert sorted(w) == sorted(f"layers.{i}.{k}" for i in range(3) for k in ("weight", "bias"))
    assert w["layers.0.weight"].shape == (64, 32) and w["layers.0.bias"].shape == (32,)
    assert w["layers.2.weight"].shape == (16, 10) and w["layers.2.bias"].shape == (10,)
    with np.load(path, allow_pickle=False) as z:  # plain npz, no pickle needed
        assert z["layers.1.weight"].dtype == np.float32
    # --init starts from exactly those weights
    model = build_run(FAST + ["--hidden", "32,16", "--init", str(path)]).model
    for name, value in w.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)


def test_init_shape_mismatch_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "w.npz"
    assert main(FAST + ["--save", str(path)]) == 0
    assert main(FAST + ["--hidden", "32", "--init", str(path)]) == 2
    err = capsys.readouterr().err
    assert "layers.0.weight has shape (64, 16)" in err and "needs (64, 32)" in err


def test_init_refuses_pickles(tmp_path, capsys):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"layers.0.weight": np.array([object()], dtype=object)})
    assert main(FAST + ["--init", str(path)]) == 2
    assert "--init" in capsys.readouterr().err


def test_metrics_has_one_json_line_per_epoch(tmp_path):
    path = tmp_path / "m.jsonl"
    assert main(FAST + ["--epochs", "3", "--metrics", str(path)]) == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for r in lines:
        for key in ("train_loss", "test_loss", "test_accuracy", "epoch_time_s", "samples_per_s"):
            assert np.isfinite(r[key]), key
        assert 0 <= r["test_accuracy"] <= 1


def test_plain_sgd_is_w_minus_lr_times_mean_gradient():
    """--optimizer sgd --momentum 0: one full-batch step is W - lr * dL/dW, L the batch mean."""
    argv = ["--dataset", "digits", "--hidden", "8", "--epochs", "1", "--batch-size", "5000",
            "--optimizer", "sgd", "--momentum", "0", "--lr", "0.5", "--lr-schedule", "constant",
            "--dtype", "float64", "--quiet"]
    run = build_run(argv)
    data, model = run.data, run.model
    ref = MLP(model.sizes, dtype=np.float64, seed=0)
    # one batch: the epoch's order does not change the mean
    x, y = data.train_features(slice(None)), data.y_train
    ctx = Context()
    logits = ref.forward(x, ctx)
    d = np.empty_like(logits)
    ref.ops.loss("cross_entropy", logits, y, 1.0 / len(x), d)
    ref.zero_grad()
    ref.backward(d, ctx)
    expected = ref.flat.data - 0.5 * ref.flat.grad
    train(run, log=lambda *a: None)
    np.testing.assert_allclose(model.flat.data, expected, rtol=0, atol=1e-12)


def test_digits_default_settings_reach_096():
    _, history = run_training(["--dataset", "digits", "--quiet"])
    assert history[-1]["test_accuracy"] >= 0.96


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "256,x"], "'x' is not an integer"),
    (["--hidden", "0"], "hidden sizes must be positive"),
    (["--lr", "-1"], "expected a finite number >= 0"),
    (["--epochs", "abc"], "expected a positive integer"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--save", "/nonexistent/dir/w.npz"], "does not exist"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov needs --optimizer sgd"),
])
def test_bad_options_are_clear_errors(argv, message):
    rc, out = train_cli(*argv)
    assert rc == 2 and message in out, out


def test_errors_end_every_rank_under_mpirun():
    rc, out = train_cli("--dataset", "digits", "--batch-size", "1", ranks=2, timeout=60)
    assert rc != 0
    assert out.count("--batch-size 1 is smaller than the 2 ranks") == 1, out


WARM_UP_CHECK = """
import sys
from numba.core.registry import CPUDispatcher
from mpnn.kernels import numba_ops
from mpi4py import MPI
from mpnn.runtime.loop import train
from mpnn.runtime.setup import setup
from mpnn.train import parse_config

kernels = [f for f in vars(numba_ops).values() if isinstance(f, CPUDispatcher)]
run = setup(parse_config(sys.argv[1:]), MPI.COMM_SELF)
compiled = {f.__name__: len(f.signatures) for f in kernels}
assert sum(compiled.values()) > 0, compiled
train(run, log=lambda *a: None)
after = {f.__name__: len(f.signatures) for f in kernels}
assert after == compiled, f"compiled during training: {after} (after setup: {compiled})"
"""


@pytest.mark.parametrize("extra", [
    ["--optimizer", "adam", "--weight-decay", "0.01"],
    ["--optimizer", "sgd", "--momentum", "0.9", "--nesterov", "--activation", "tanh",
     "--loss", "mse", "--dtype", "float64"],
    ["--optimizer", "sgd", "--momentum", "0", "--activation", "sigmoid"],
])
def test_setup_compiles_every_kernel_the_run_calls(extra):
    # setup's warm-up runs the run's kernels on arrays of the run's types, so the
    # first epoch compiles nothing (its time and samples/s measure training only).
    # A fresh process: kernels compiled by other tests would hide a gap.
    argv = FAST + ["--backend", "numba", "--batch-size", "100"] + extra
    p = subprocess.run([sys.executable, "-c", WARM_UP_CHECK, *argv], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr


def test_init_reads_a_checkpoints_weights(tmp_path):
    # the resume refusal tells users to start a new run from a checkpoint's weights
    # with --init: it reads the weights (checksum verified), not the optimizer state
    d = tmp_path / "ck"
    assert main(FAST + ["--checkpoint-dir", str(d)]) == 0
    path = d / "ckpt-000000023.npz"
    model = build_run(FAST + ["--init", str(path)]).model
    with np.load(path, allow_pickle=False) as z:
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(value, z[name])
    corrupt = tmp_path / "corrupt.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["layers.0.bias"] = arrays["layers.0.bias"] + 1  # the checksum no longer matches
    np.savez(corrupt, **arrays)
    assert main(FAST + ["--init", str(corrupt)]) == 2


def test_init_values_beyond_the_run_dtype_are_refused():
    m = MLP([3, 2], dtype=np.float32)
    state = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    state["layers.0.weight"][1, 1] = 1e300  # finite in the file, inf in float32
    with pytest.raises(ValueError, match="holds values too large for float32"):
        m.load_state_dict(state, source="--init w.npz")
