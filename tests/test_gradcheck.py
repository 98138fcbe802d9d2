"""`python -m mpnn.gradcheck`: the CLI passes and lists every tensor, its options are
validated, its tolerances follow --eps, and broken backwards (float64 or float32) are caught."""

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
THREE_LAYERS = [f"layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")]
FLOAT64_ROWS = (
    [("linear", t) for t in ("dx", "dW", "db")]
    + [(a, "dz") for a in ACTS]
    + [("softmax_cross_entropy", "dlogits"), ("mse", "dpred")]
    + [(f"ops.linear_act[{a}]", t) for a in ACTS for t in ("dx", "dW", "db")]
    + [(f"ops.loss[{loss}]", "dlogits") for loss in LOSSES]
    + [(f"mlp[{a},{loss}]", t) for a in ACTS for loss in LOSSES for t in THREE_LAYERS + ["dx"]]
    + [("mlp[relu,cross_entropy]/B=1", t) for t in THREE_LAYERS + ["dx"]]
    + [("mlp[tanh,mse]/B=2", t) for t in THREE_LAYERS + ["dx"]]
    + [(f"mlp[none,{loss}]", t) for loss in LOSSES
       for t in ("layers.0.weight", "layers.0.bias", "dx")]
    + [("mlp[relu,cross_entropy]/layers=1:3", t) for t in THREE_LAYERS[2:] + ["dx"]]
    + [("mlp[tanh,mse]/layers=1:3,no_dx", t) for t in THREE_LAYERS[2:]]
    + [("mlp[sigmoid,dy]/layers=1:2", t) for t in ("layers.1.weight", "layers.1.bias", "dx")]
    + [("mlp[relu,dy]/layers=1:2,no_dx", t) for t in ("layers.1.weight", "layers.1.bias")]
)


def float32_rows(backend):
    p = f"f32.{backend}."
    return ([(f"{p}linear_act[{a}]", t) for a in ACTS for t in ("y", "dx", "dW", "db")]
            + [(f"{p}loss[{loss}]", t) for loss in LOSSES for t in ("loss", "dlogits")]
            + [(f"{p}mlp[{a},{loss}]", t) for a, loss in gradcheck.F32_MODEL_CHECKS
               for t in THREE_LAYERS + ["dx"]])


def numba_or_skip():
    pytest.importorskip("numba")
    from mpnn.kernels.numba_ops import NumbaOps

    return NumbaOps


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mpnn.gradcheck", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def keys(results):
    return [(r.check, r.tensor) for r in results]


# ---------------------------------------------------------------- the CLI


def test_cli_passes_and_lists_every_tensor():
    proc = run_cli("--seed", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    table = {(r[0], r[1]): r for r in rows if len(r) == 5 and r[0] != "check"}
    expected = FLOAT64_ROWS + float32_rows("numpy")
    for key in expected:
        assert key in table, f"{key} missing from the table:\n{proc.stdout}"
        assert table[key][4] == "ok"
        assert float(table[key][2]) <= float(table[key][3])
    assert len(table) >= len(expected)  # + numba's and cupy's float32 rows where usable
    assert "all within tolerance" in proc.stdout


def test_cli_unavailable_backend_is_a_clear_error():
    proc = run_cli("--backend", "cupy")
    if proc.returncode == 0:
        pytest.skip("cupy backend is available here")
    assert proc.returncode == 2
    assert "backend 'cupy' is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("option, value, says", [
    ("--seed", "-1", "an integer >= 0"),
    ("--seed", "1.5", "an integer >= 0"),
    ("--eps", "0", "truncation"),
    ("--eps", "-1e-6", "truncation"),
    ("--eps", "inf", "truncation"),
    ("--eps", "nan", "round-off"),
    ("--eps", "1e-300", "round-off"),
    ("--eps", "0.1", "truncation"),
    ("--eps", "tiny", "a number"),
])
def test_cli_rejects_bad_options_naming_them(option, value, says, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's error, before any check runs
        gradcheck.main([f"{option}={value}"])  # "=": a negative value is not an option
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert f"argument {option}" in err and says in err and value in err


# ------------------------------------------------------- tolerance vs eps


def test_accepted_eps_range_keeps_a_one_percent_error_failing():
    lo, hi = gradcheck.EPS_RANGE
    assert gradcheck.MAX_TOL <= 1e-3
    for eps in (lo, hi):
        assert gradcheck.fd_tolerance(eps, "op") <= gradcheck.fd_tolerance(eps, "model")
        assert gradcheck.fd_tolerance(eps, "model") <= gradcheck.MAX_TOL
    for eps in (lo / 10, hi * 10):  # further out, the model's tolerance would hide a 1% bug
        assert gradcheck.fd_tolerance(eps, "model") > gradcheck.MAX_TOL


@pytest.mark.parametrize("eps", [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8])
def test_correct_gradients_pass_at_every_eps(eps):
    for seed in (0, 1):
        results = gradcheck.check_all(seed=seed, eps=eps, float32=[])
        assert all(r.ok for r in results), gradcheck.format_table([r for r in results if not r.ok])


@pytest.mark.parametrize("eps", [gradcheck.EPS_RANGE[0], 1e-8, 1e-6, 1e-4, gradcheck.EPS_RANGE[1]])
def test_one_percent_wrong_backward_fails_at_every_eps(eps, monkeypatch):
    forward, backward = F.ACTIVATIONS["tanh"]
    monkeypatch.setitem(F.ACTIVATIONS, "tanh", (forward, lambda dy, y: 1.01 * backward(dy, y)))

    class OnePercentOff(NumpyOps):  # dx of every layer 1% too large
        def input_grad(self, dz, W, out):
            return np.multiply(super().input_grad(dz, W, out), 1.01, out=out)

    results = gradcheck.check_all(seed=0, backend=OnePercentOff(), eps=eps, float32=[])
    bad = {key for key, r in zip(keys(results), results, strict=True) if not r.ok}
    assert {("tanh", "dz"), ("ops.linear_act[tanh]", "dx"), ("mlp[tanh,mse]", "layers.0.weight"),
            ("ops.linear_act[relu]", "dx"), ("mlp[relu,mse]", "dx"),
            ("mlp[sigmoid,dy]/layers=1:2", "dx"),
            ("mlp[tanh,mse]/layers=1:3,no_dx", "layers.1.weight")} - bad == set()
    assert ("mlp[relu,mse]", "layers.2.weight") not in bad  # above every input_grad
    assert ("linear", "dx") not in bad and ("sigmoid", "dz") not in bad


# ----------------------------------------------------------- coverage


def test_check_all_lists_every_tensor_in_order():
    results = gradcheck.check_all(seed=0, float32=[NumpyOps()])
    assert keys(results) == FLOAT64_ROWS + float32_rows("numpy")
    assert all(r.ok for r in results), gradcheck.format_table(results)


def test_no_dx_checks_report_no_input_gradient():
    results = gradcheck.check_all(seed=0, float32=[])
    for check in ("mlp[tanh,mse]/layers=1:3,no_dx", "mlp[relu,dy]/layers=1:2,no_dx"):
        assert [t for c, t in keys(results) if c == check][-1] != "dx"


def test_float32_backends_follow_the_backend_option():
    numba_or_skip()
    assert [o.name for o in gradcheck.float32_backends("numba")[0]] == ["numba"]
    default, skipped = gradcheck.float32_backends("numpy")
    assert [o.name for o in default][:2] == ["numpy", "numba"]
    assert len(default) + len(skipped) == 3  # cupy: checked, or skipped with the reason


def test_numba_float32_kernels_pass_against_float64():
    NumbaOps = numba_or_skip()
    rng = np.random.default_rng(0)
    results = gradcheck.check_float32(NumbaOps(), rng)
    assert keys(results) == float32_rows("numba")
    assert all(r.ok for r in results), gradcheck.format_table(results)
    assert max(r.error / r.tol for r in results) < 0.5  # the budget is not a close shave


def test_float32_precision_loss_is_detected():
    NumbaOps = numba_or_skip()

    class HalfPrecisionWeightGrad(NumbaOps):  # dW rounded through float16 in float32 only
        def weight_grad(self, x, dz, dW):
            super().weight_grad(x, dz, dW)
            if dW.dtype == np.float32:
                dW[...] = dW.astype(np.float16)

    results = gradcheck.check_all(seed=0, backend=HalfPrecisionWeightGrad())
    bad = {key for key, r in zip(keys(results), results, strict=True) if not r.ok}
    assert ("f32.numba.linear_act[tanh]", "dW") in bad
    assert ("f32.numba.mlp[relu,cross_entropy]", "layers.0.weight") in bad
    assert all(c.startswith("f32.") and (t == "dW" or t.endswith(".weight")) for c, t in bad)
    assert not any(c.startswith(("ops.", "mlp[")) for c, _ in bad)  # float64 is fine


def test_single_row_bug_is_caught_by_the_one_row_model():
    class SqueezedBias(NumpyOps):  # db from a squeezed dz: wrong only when B = 1
        def act_bias_backward(self, dy, y, act, db):
            if act != "identity":
                dy[...] = F.ACTIVATIONS[act][1](dy, y)
            db += np.squeeze(dy).sum(axis=0)
            return dy

    results = gradcheck.check_all(seed=0, backend=SqueezedBias(), float32=[])
    bad = {c for (c, _), r in zip(keys(results), results, strict=True) if not r.ok}
    assert bad == {"mlp[relu,cross_entropy]/B=1"}


# --------------------------------------------------------- broken backwards


def test_broken_linear_backward_is_detected(monkeypatch):
    real = F.linear_backward

    def broken(dy, cache):  # forgets the sum over rows: db from the first row only
        dx, dW, _ = real(dy, cache)
        return dx, dW, dy[0].copy()

    monkeypatch.setattr(F, "linear_backward", broken)
    results = {(r.check, r.tensor): r for r in gradcheck.check_all(seed=0, float32=[])}
    assert not results[("linear", "db")].ok
    assert results[("linear", "db")].error > 1e-2
    assert results[("linear", "dx")].ok and results[("linear", "dW")].ok


def test_broken_activation_backward_is_detected(monkeypatch):
    # tanh'(z) written as 1 − y instead of 1 − y²
    monkeypatch.setitem(F.ACTIVATIONS, "tanh", (F.tanh_forward, lambda dy, y: dy * (1 - y)))
    bad = {(r.check, r.tensor) for r in gradcheck.check_all(seed=0, float32=[]) if not r.ok}
    assert ("tanh", "dz") in bad
    assert ("mlp[tanh,cross_entropy]", "layers.0.weight") in bad  # the numpy op set uses it too
    assert ("mlp[tanh,mse]/layers=1:3,no_dx", "layers.1.weight") in bad
    assert not any(c.startswith(("relu", "mlp[relu")) for c, _ in bad)


def test_broken_op_set_is_detected_in_model_check():
    class BrokenOps(NumpyOps):
        def weight_grad(self, x, dz, dW):  # adds 2·xᵀ·dz: a wrong factor
            dW += 2 * (x.T @ dz)

    results = gradcheck.check_all(seed=0, backend=BrokenOps())
    bad = {(r.check, r.tensor) for r in results if not r.ok}
    assert ("ops.linear_act[relu]", "dW") in bad
    assert ("mlp[sigmoid,mse]", "layers.1.weight") in bad
    assert ("mlp[none,mse]", "layers.0.weight") in bad
    assert ("f32.numpy.mlp[tanh,mse]", "layers.1.weight") in bad  # against the true reference
    assert ("linear", "dW") not in bad  # functional.py itself is fine


def test_nan_gradient_fails():
    r = gradcheck.Result("x", "dx", float("nan"), 1e-7)
    assert not r.ok
    assert np.isnan(gradcheck.rel_error(np.array([np.nan]), np.array([1.0])))


def test_distributed_gradcheck_passes_and_catches_a_broken_operator():
    """mpirun -n 2 python -m mpnn.gradcheck --tp 2 passes; with f's backward missing
    its Allreduce (or g's backward summing what it should pass on) it exits 1."""
    import os
    import subprocess
    import sys

    from conftest import MPIRUN

    if not os.path.exists(MPIRUN):
        pytest.skip("mpirun not found")

    def run(code):
        p = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return p.returncode, p.stdout + p.stderr

    main = "import sys; from mpnn.gradcheck.cli import main; sys.exit(main(['--tp', '2']))"
    rc, out = run(main)
    assert rc == 0, out
    assert "tp2.op.f" in out and "tp2.op.g" in out and "all within tolerance" in out
    for broken in ("f_backward = lambda self, dx: dx",
                   "g_backward = lambda self, dy: self._allreduce(dy)"):
        rc, out = run(f"from mpnn.parallel import tensor\ntensor.TensorParallelMLP.{broken}\n"
                      + main)
        assert rc == 1 and "FAILED" in out, (broken, out[-2000:])
