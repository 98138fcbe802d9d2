"""`python -m mpnn.gradcheck`: the CLI passes and lists every tensor, and a
broken backward is caught."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mpnn import gradcheck
from mpnn.kernels.numpy_ops import NumpyOps
from mpnn.nn import functional as F

ACTS = ("relu", "tanh", "sigmoid", "identity")
LOSSES = ("cross_entropy", "mse")
EXPECTED_ROWS = (
    [("linear", t) for t in ("dx", "dW", "db")]
    + [(a, "dz") for a in ACTS]
    + [("softmax_cross_entropy", "dlogits"), ("mse", "dpred")]
    + [(f"ops.linear_act[{a}]", t) for a in ACTS for t in ("dx", "dW", "db")]
    + [(f"ops.loss[{loss}]", "dlogits") for loss in LOSSES]
    + [(f"mlp[{a},{loss}]", t) for a in ACTS for loss in LOSSES
       for t in [f"layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")] + ["dx"]]
)


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mpnn.gradcheck", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_passes_and_lists_every_tensor():
    proc = run_cli("--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    table = {(r[0], r[1]): r for r in rows if len(r) == 5 and r[0] != "check"}
    for key in EXPECTED_ROWS:
        assert key in table, f"{key} missing from the table:\n{proc.stdout}"
        assert table[key][4] == "ok"
        assert float(table[key][2]) <= float(table[key][3])
    assert len(table) == len(EXPECTED_ROWS)
    assert "all within tolerance" in proc.stdout


def test_cli_unavailable_backend_is_a_clear_error():
    proc = run_cli("--backend", "cupy")
    if proc.returncode == 0:
        pytest.skip("cupy backend is available here")
    assert proc.returncode == 2
    assert "backend 'cupy' is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_rejects_bad_eps():
    proc = run_cli("--eps", "0")
    assert proc.returncode != 0 and "--eps" in proc.stderr


def test_check_all_lists_every_tensor_in_order():
    results = gradcheck.check_all(seed=0)
    assert [(r.check, r.tensor) for r in results] == EXPECTED_ROWS
    assert all(r.ok for r in results), gradcheck.format_table(results)


def test_broken_linear_backward_is_detected(monkeypatch):
    real = F.linear_backward

    def broken(dy, cache):  # forgets the sum over rows: db from the first row only
        dx, dW, _ = real(dy, cache)
        return dx, dW, dy[0].copy()

    monkeypatch.setattr(F, "linear_backward", broken)
    results = {(r.check, r.tensor): r for r in gradcheck.check_all(seed=0)}
    assert not results[("linear", "db")].ok
    assert results[("linear", "db")].error > 1e-2
    assert results[("linear", "dx")].ok and results[("linear", "dW")].ok


def test_broken_activation_backward_is_detected(monkeypatch):
    # tanh'(z) written as 1 − y instead of 1 − y²
    monkeypatch.setitem(F.ACTIVATIONS, "tanh", (F.tanh_forward, lambda dy, y: dy * (1 - y)))
    bad = {(r.check, r.tensor) for r in gradcheck.check_all(seed=0) if not r.ok}
    assert ("tanh", "dz") in bad
    assert ("mlp[tanh,cross_entropy]", "layers.0.weight") in bad  # the numpy op set uses it too
    assert not any(c.startswith(("relu", "mlp[relu")) for c, _ in bad)


def test_broken_op_set_is_detected_in_model_check(monkeypatch):
    class BrokenOps(NumpyOps):
        def weight_grad(self, x, dz, dW):  # adds 2·xᵀ·dz: a wrong factor
            dW += 2 * (x.T @ dz)

    results = gradcheck.check_all(seed=0, backend=BrokenOps())
    bad = {(r.check, r.tensor) for r in results if not r.ok}
    assert ("ops.linear_act[relu]", "dW") in bad
    assert ("mlp[sigmoid,mse]", "layers.1.weight") in bad
    assert ("linear", "dW") not in bad  # functional.py itself is fine


def test_nan_gradient_fails():
    r = gradcheck.Result("x", "dx", float("nan"), 1e-7)
    assert not r.ok
    assert np.isnan(gradcheck.rel_error(np.array([np.nan]), np.array([1.0])))
