"""Every fast backend agrees with the NumPy reference op set (the specification).

Each op is run on both backends from identical inputs and compared: float32
and float64, several shapes (one row, odd sizes), every activation, both
losses, every optimizer variant with and without weight decay; then a few
training steps per backend must land on the same weights as NumPy. Every
backend implements the whole ``base.OpSet`` interface, and the glue written
there once (loss and label checks, Adam's scalars) is tested on its own.

CuPy tests skip without a GPU, saying so.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from mpnn.kernels import BACKENDS as BACKEND_NAMES
from mpnn.kernels import get_ops
from mpnn.kernels.base import AdamScalars, HostOpSet, OpSet, grad_factor
from mpnn.kernels.cupy_ops import CupyOps, gpu_available
from mpnn.kernels.numba_ops import NumbaOps
from mpnn.kernels.numpy_ops import NumpyOps
from mpnn.nn.functional import HIDDEN_ACTIVATIONS, LOSS_NAMES
from mpnn.nn.model import MLP, Context
from mpnn.nn.optim import make_optimizer

REF = NumpyOps()
DTYPES = (np.float32, np.float64)
SHAPES = ((1, 1, 1), (1, 7, 5), (3, 5, 2), (17, 33, 10), (64, 784, 256), (129, 13, 127))
ACTS = HIDDEN_ACTIVATIONS
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}

requires_gpu = pytest.mark.skipif(not gpu_available(), reason="no GPU / cupy not installed")
BACKENDS = ["numba", pytest.param("cupy", marks=requires_gpu)]


@pytest.fixture(scope="module", params=BACKENDS)
def ops(request):
    return get_ops(request.param)


def host(ops, a):
    return np.asarray(ops.to_host(a))


def dev(ops, a):
    return ops.to_device(np.array(a, copy=True))


def close(actual, expected, dtype, scale=1.0):
    tol = TOL[np.dtype(dtype).type]
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"] * scale,
                               atol=tol["atol"] * scale)


def rand(rng, shape, dtype, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(dtype)


# ---------------------------------------------------------------------- layers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,I,O", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_linear_act(ops, dtype, B, I, O, act):
    rng = np.random.default_rng(B * 1000 + I * 10 + O)
    x, W, b = rand(rng, (B, I), dtype), rand(rng, (I, O), dtype), rand(rng, (O,), dtype)
    expected = REF.linear_act(x, W, b, act, np.empty((B, O), dtype))
    out = dev(ops, np.full((B, O), np.nan, dtype))
    got = ops.linear_act(dev(ops, x), dev(ops, W), dev(ops, b), act, out)
    assert got is out
    close(host(ops, out), expected, dtype, scale=max(1.0, I / 16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,I,O", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_bias_act(ops, dtype, B, I, O, act):
    """act(z + b) in place: linear_act's second half, from the reference's equation."""
    from mpnn.nn import functional as F

    rng = np.random.default_rng(B * 7 + O)
    z, b = rand(rng, (B, O), dtype, -3, 3), rand(rng, (O,), dtype)
    expected = F.ACTIVATIONS[act][0](z.astype(np.float64) + b)[0]
    out = dev(ops, z.copy())
    assert ops.bias_act(out, dev(ops, b), act) is out
    close(host(ops, out), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,I,O", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_act_bias_backward(ops, dtype, B, I, O, act):
    rng = np.random.default_rng(B + I + O)
    z = rand(rng, (B, O), dtype, -3, 3)
    y = REF.linear_act(z, np.eye(O, dtype=dtype), np.zeros(O, dtype), act, np.empty_like(z))
    dy = rand(rng, (B, O), dtype)
    db0 = rand(rng, (O,), dtype)  # gradients accumulate into what is there
    dz_ref, db_ref = dy.copy(), db0.copy()
    REF.act_bias_backward(dz_ref, y, act, db_ref)
    dz, db = dev(ops, dy), dev(ops, db0)
    ops.act_bias_backward(dz, dev(ops, y), act, db)
    close(host(ops, dz), dz_ref, dtype)
    close(host(ops, db), db_ref, dtype, scale=max(1.0, B / 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,I,O", SHAPES)
def test_weight_and_input_grad(ops, dtype, B, I, O):
    rng = np.random.default_rng(7 * B + I)
    x, dz, W = rand(rng, (B, I), dtype), rand(rng, (B, O), dtype), rand(rng, (I, O), dtype)
    dW0 = rand(rng, (I, O), dtype)
    dW_ref = dW0.copy()
    REF.weight_grad(x, dz, dW_ref)
    flat = dev(ops, np.concatenate([dW0.ravel(), [dtype(5)]]))  # a view, as in the flat buffer
    dW = flat[:I * O].reshape(I, O)
    ops.weight_grad(dev(ops, x), dev(ops, dz), dW)
    close(host(ops, dW), dW_ref, dtype, scale=max(1.0, B / 8))
    assert host(ops, flat)[-1] == 5  # nothing written past the view

    dx_ref = REF.input_grad(dz, W, np.empty((B, I), dtype))
    out = dev(ops, np.full((B, I), np.nan, dtype))
    ops.input_grad(dev(ops, dz), dev(ops, W), out)
    close(host(ops, out), dx_ref, dtype, scale=max(1.0, O / 8))


# ---------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C", [(1, 1), (1, 10), (5, 3), (64, 10), (257, 17)])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_loss_and_predict_stats(ops, dtype, B, C, loss):
    rng = np.random.default_rng(B * C)
    logits = rand(rng, (B, C), dtype, -8, 8)
    labels = rng.integers(0, C, size=B)
    scale = 1.0 / (3 * B)  # any scale: the trainer's is 1/global_batch
    d_ref = np.empty_like(logits)
    loss_ref = REF.loss(loss, logits, labels, scale, d_ref)
    out = dev(ops, np.full((B, C), np.nan, dtype))
    got = ops.loss(loss, dev(ops, logits), dev(ops, labels), scale, out)
    assert isinstance(got, float)
    close(got, loss_ref, dtype, scale=10.0)
    close(host(ops, out), d_ref, dtype)

    stats_ref = REF.predict_stats(logits, labels, loss)
    stats = ops.predict_stats(dev(ops, logits), dev(ops, labels), loss)
    close(stats[0], stats_ref[0], dtype, scale=10.0)
    assert stats[1] == stats_ref[1]


def test_loss_extreme_logits_are_finite(ops):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], np.float32)
    labels = np.array([1, 2])
    out = dev(ops, np.empty_like(logits))
    total = ops.loss("cross_entropy", dev(ops, logits), dev(ops, labels), 1.0, out)
    d_ref = np.empty_like(logits)
    assert np.isclose(total, REF.loss("cross_entropy", logits, labels, 1.0, d_ref), rtol=1e-6)
    close(host(ops, out), d_ref, np.float32)


def test_loss_rejects_bad_labels():
    ops = get_ops("numba")
    with pytest.raises(ValueError, match="labels must lie in"):
        ops.loss("cross_entropy", np.zeros((2, 3), np.float32), np.array([0, 3]), 1.0,
                 np.empty((2, 3), np.float32))


# ------------------------------------------------------------------- optimizers


def _opt_case(dtype, n=1031, seed=0):
    rng = np.random.default_rng(seed)
    return rand(rng, n, dtype), rand(rng, n, dtype, -0.1, 0.1), rand(rng, n, dtype, 0, 0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_step(ops, dtype, wd):
    p, g, _ = _opt_case(dtype)
    p_ref = p.copy()
    REF.sgd_step(p_ref, g, 0.1, wd)
    pd = dev(ops, p)
    ops.sgd_step(pd, dev(ops, g), 0.1, wd)
    assert host(ops, pd).dtype == dtype
    close(host(ops, pd), p_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_step(ops, dtype, wd, nesterov):
    p, g, v = _opt_case(dtype)
    p_ref, v_ref = p.copy(), v.copy()
    pd, gd, vd = dev(ops, p), dev(ops, g), dev(ops, v)
    for _ in range(3):
        REF.momentum_step(p_ref, g, v_ref, 0.05, 0.9, nesterov, wd)
        ops.momentum_step(pd, gd, vd, 0.05, 0.9, nesterov, wd)
    close(host(ops, pd), p_ref, dtype)
    close(host(ops, vd), v_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_step(ops, dtype, wd):
    p, g, _ = _opt_case(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()
    pd, gd, md, vd = dev(ops, p), dev(ops, g), dev(ops, m), dev(ops, v)
    for t in range(1, 4):
        REF.adam_step(p_ref, g, m_ref, v_ref, 1e-3, 0.9, 0.999, 1e-8, wd, t)
        ops.adam_step(pd, gd, md, vd, 1e-3, 0.9, 0.999, 1e-8, wd, t)
    close(host(ops, pd), p_ref, dtype)
    close(host(ops, md), m_ref, dtype)
    close(host(ops, vd), v_ref, dtype)


def test_optimizer_state_flushes_subnormals():
    """Dead units (g = 0) decay their velocity into subnormals; the fast
    kernel stores them as exact zeros instead (NumPy keeps the subnormal)."""
    ops = get_ops("numba")
    tiny = np.finfo(np.float32).tiny
    p = np.ones(4, np.float32)
    g = np.zeros(4, np.float32)
    v = np.array([tiny * 1.05, tiny * 0.5, -tiny * 0.25, 1.0], np.float32)
    ops.momentum_step(p, g, v, 0.1, 0.9, False, 0.0)
    assert v[0] == 0 and v[1] == 0 and v[2] == 0  # 0.9·1.05·tiny is subnormal too
    assert v[3] == np.float32(0.9)
    m = np.array([tiny * 0.5, 1.0], np.float32)
    vv = np.array([tiny * 0.5, 1.0], np.float32)
    ops.adam_step(np.ones(2, np.float32), np.zeros(2, np.float32), m, vv,
                  1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    assert m[0] == 0 and vv[0] == 0 and m[1] == np.float32(0.9)


def test_dtypes_stay_float32():
    """A float64 scalar anywhere would promote float32 buffers (NumPy 2)."""
    ops = get_ops("numba")
    rng = np.random.default_rng(0)
    x, W, b = rand(rng, (4, 3), np.float32), rand(rng, (3, 2), np.float32), rand(rng, 2, np.float32)
    out = np.empty((4, 2), np.float32)
    assert ops.linear_act(x, W, b, "sigmoid", out).dtype == np.float32
    p, g, v = _opt_case(np.float32, 8)
    m = np.zeros_like(p)
    ops.adam_step(p, g, m, v, np.float64(1e-3), 0.9, 0.999, 1e-8, 0.1, 1)
    ops.momentum_step(p, g, v, np.float64(0.1), 0.9, True, 0.1)
    assert p.dtype == m.dtype == v.dtype == np.float32


# ------------------------------------------------------------------- training


def _train(backend, dtype, optimizer, steps=5, act="relu", loss="cross_entropy"):
    ops = get_ops(backend)
    sizes = [20, 16, 12, 5]
    model = MLP(sizes, activation=act, dtype=dtype, seed=3, ops=ops)
    opt = make_optimizer(optimizer, model.flat, ops, lr=0.05,
                         momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)
    rng = np.random.default_rng(11)
    x = ops.to_device(rng.normal(size=(32, sizes[0])).astype(dtype))
    labels = ops.to_device(rng.integers(0, sizes[-1], size=32))
    ctx = Context()
    dlogits = ops.xp.empty((32, sizes[-1]), dtype=dtype)
    losses = []
    for _ in range(steps):
        model.zero_grad()
        logits = model.forward(x, ctx)
        losses.append(ops.loss(loss, logits, labels, 1.0 / 32, dlogits))
        model.backward(dlogits, ctx)
        opt.step()
    return host(ops, model.flat.data), losses


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("act,loss", [("relu", "cross_entropy"), ("tanh", "mse"),
                                      ("sigmoid", "cross_entropy")])
def test_training_matches_numpy(ops, dtype, optimizer, act, loss):
    w_ref, l_ref = _train("numpy", dtype, optimizer, act=act, loss=loss)
    w, losses = _train(ops.name, dtype, optimizer, act=act, loss=loss)
    scale = 1.0 if dtype == np.float64 else 5.0
    if optimizer == "adam":  # m/√v amplifies rounding where the gradient is near 0
        scale *= 1e3 if dtype == np.float64 else 20.0
    close(w, w_ref, dtype, scale=scale)
    close(losses, l_ref, dtype, scale=10.0)


def test_auto_backend_without_gpu():
    if gpu_available():
        pytest.skip("a GPU is present: auto picks cupy")
    assert get_ops("auto").name == "numba"


def test_gpu_available_is_quiet_without_cupy():
    assert gpu_available() in (True, False)


@requires_gpu
def test_cupy_synchronize_and_transfers():
    ops = get_ops("cupy")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = ops.to_device(a)
    assert isinstance(d, ops.xp.ndarray)
    ops.synchronize()
    np.testing.assert_array_equal(ops.to_host(d), a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,I,O", SHAPES)
def test_weight_grad_on_numpys_blas(dtype, B, I, O):
    """The path taken when SciPy's BLAS would fight NumPy's for cores: a
    reused scratch and one add, same result."""
    from mpnn.kernels.numba_ops import NumbaOps

    ops = NumbaOps()
    ops._gemm_beta1 = {}
    rng = np.random.default_rng(B + 2 * I + 3 * O)
    x, dz, dW0 = rand(rng, (B, I), dtype), rand(rng, (B, O), dtype), rand(rng, (I, O), dtype)
    dW_ref = dW0.copy()
    REF.weight_grad(x, dz, dW_ref)
    for _ in range(2):  # the second call reuses the scratch
        dW = dW0.copy()
        ops.weight_grad(x, dz, dW)
        close(dW, dW_ref, dtype, scale=max(1.0, B / 8))


def test_scipy_gemm_only_without_competing_blas_threads():
    from threadpoolctl import threadpool_info, threadpool_limits

    from mpnn.kernels.numba_ops import NumbaOps

    with threadpool_limits(limits=1, user_api="blas"):
        assert NumbaOps()._gemm_beta1  # one thread: SciPy's beta = 1 gemm is safe
    libs = {i["filepath"] for i in threadpool_info() if i.get("user_api") == "blas"}
    with threadpool_limits(limits=2, user_api="blas"):
        if len(libs) > 1:
            assert NumbaOps()._gemm_beta1 == {}


def test_scipy_gemm_used_when_scipy_loads_after_the_thread_limit():
    """The trainer's order, in a fresh interpreter: NumPy's BLAS limited to one
    thread, then the op set built, which loads SciPy's BLAS for the first time:
    SciPy's gemm gets NumPy's limit and is used (found on a 1-thread pipeline
    run whose weight gradients all took the scratch-and-add path)."""
    import subprocess
    import sys

    code = ("import numpy\n"
            "from threadpoolctl import threadpool_limits\n"
            "threadpool_limits(limits=1, user_api='blas')\n"
            "from mpnn.kernels.numba_ops import NumbaOps\n"
            "print(sorted(str(k) for k in NumbaOps()._gemm_beta1))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['float32', 'float64']"
    # and when something (scikit-learn loading the digits) imported SciPy after the limit
    code = code.replace("from mpnn.kernels", "import scipy.linalg\nfrom mpnn.kernels")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['float32', 'float64']"


# ------------------------------------------------------------ the interface

OPS = ("linear_act", "bias_act", "act_bias_backward", "weight_grad", "input_grad", "loss",
       "predict_stats", "sgd_step", "momentum_step", "adam_step", "to_device", "to_host",
       "synchronize")


@pytest.mark.parametrize("cls", [NumpyOps, NumbaOps, CupyOps])
def test_every_backend_implements_the_whole_op_set(cls):
    """Checked on the classes, so CupyOps is covered without a GPU."""
    assert issubclass(cls, OpSet)
    assert not cls.__abstractmethods__, f"{cls.__name__} lacks {sorted(cls.__abstractmethods__)}"
    assert cls.name in BACKEND_NAMES
    for op in OPS:
        assert inspect.signature(getattr(cls, op)) == inspect.signature(getattr(OpSet, op)), op
    abstract = {name for name, f in vars(OpSet).items() if getattr(f, "__isabstractmethod__", 0)}
    assert {op for op in abstract if not op.startswith("_")} <= set(OPS)  # the list is complete


def test_cpu_backends_are_host_op_sets():
    for name in ("numpy", "numba"):
        ops = get_ops(name)
        assert isinstance(ops, HostOpSet) and ops.xp is np and ops.name == name
        a = np.ones(3)
        assert ops.to_device(a) is a and ops.to_host(a) is a
        ops.synchronize()


def test_an_incomplete_backend_cannot_be_built():
    class OnlyForward(HostOpSet):
        name = "partial"

        def linear_act(self, x, W, b, act, out):
            return out

    with pytest.raises(TypeError, match="abstract"):
        OnlyForward()


# ------------------------------------------------------------ the shared glue

CPU = ("numpy", "numba")


@pytest.mark.parametrize("backend", CPU)
def test_unknown_loss_names_the_choices(backend):
    ops = get_ops(backend)
    logits, labels = np.zeros((2, 3), np.float32), np.array([0, 1])
    with pytest.raises(ValueError, match="unknown loss 'hinge'; choose one of cross_entropy, mse"):
        ops.loss("hinge", logits, labels, 1.0, np.empty_like(logits))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        ops.predict_stats(logits, labels, "hinge")


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("labels,lo,hi", [([0, 3], 0, 3), ([-1, 2], -1, 2)])
def test_labels_out_of_range_are_rejected(backend, loss, labels, lo, hi):
    ops = get_ops(backend)
    logits, labels = np.zeros((2, 3), np.float32), np.array(labels)
    msg = rf"labels must lie in \[0, 3\) for 3 outputs; got min {lo}, max {hi}"
    with pytest.raises(ValueError, match=msg):
        ops.loss(loss, logits, labels, 1.0, np.empty_like(logits))
    with pytest.raises(ValueError, match=msg):
        ops.predict_stats(logits, labels, loss)


@pytest.mark.parametrize("backend", CPU)
def test_adam_counts_steps_from_one(backend):
    p = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="counts steps from 1"):
        get_ops(backend).adam_step(p, p, p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_scalars_are_the_kernels_formulas(dtype):
    """The fused kernels get exactly these numbers, cast once to the buffers' dtype."""
    lr, b1, b2, eps, wd, t = 3e-3, 0.9, 0.999, 1e-8, 0.01, 7
    d = np.dtype(dtype).type
    expected = (d(lr / (1 - b1 ** t)), d(b1), d(b2), d(1 - b1), d(1 - b2), d(1 / (1 - b2 ** t)),
                d(eps), d(1 - lr * wd), d(np.finfo(dtype).tiny))
    got = AdamScalars.at(lr, b1, b2, eps, wd, t).kernel_args(dtype)
    assert [type(a) for a in got] == [d] * len(expected)
    assert got == expected
    assert grad_factor("cross_entropy", 0.25, 10, dtype) == d(0.25)
    assert grad_factor("mse", 0.25, 10, dtype) == d(2 * 0.25 / 10)


class _Recorder:
    """Stands in for a CuPy kernel: keeps the arguments of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


class _Accumulator:
    """Stands in for CupyOps' device accumulator (loss, correct, bad labels)."""

    def __init__(self, values):
        self.values = np.array(values, np.float64)

    def fill(self, _):
        pass

    def get(self):
        return self.values


def _cupy_glue_without_gpu(acc=(2.5, 1, 0)):
    """A CupyOps whose kernels are recorders: its glue runs on the host, no CuPy needed."""
    ops = object.__new__(CupyOps)  # skips __init__, which needs a GPU
    ops.xp = np
    ops._sgd, ops._momentum, ops._adam = _Recorder(), _Recorder(), _Recorder()
    ops._acc = _Accumulator(acc)
    ops._loss_kernels = {(name, np.dtype(np.float32)): _Recorder() for name in LOSS_NAMES}
    return ops


def _same_args(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a is b or (type(a) is type(b) and a == b), (a, b)


def test_cupy_optimizer_kernels_get_the_same_scalars():
    ops = _cupy_glue_without_gpu()
    f = np.float32
    p, g, m, v = (np.ones(4, f) for _ in range(4))
    ops.sgd_step(p, g, 0.1, 0.01)
    _same_args(ops._sgd.calls[0], (g, f(0.1), f(0.01), p))
    ops.momentum_step(p, g, v, 0.1, 0.9, True, 0.01)
    _same_args(ops._momentum.calls[0],
               (g, f(0.1), f(0.9), f(0.01), np.finfo(f).tiny, np.int32(1), p, v))
    ops.adam_step(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    _same_args(ops._adam.calls[0], (g, f(1e-3 / (1 - 0.9 ** 3)), f(0.9), f(0.999), f(1 - 0.9),
                                    f(1 - 0.999), f(1 / (1 - 0.999 ** 3)), f(1e-8),
                                    f(1 - 1e-3 * 0.01), np.finfo(f).tiny, p, m, v))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_cupy_loss_glue(loss):
    ops = _cupy_glue_without_gpu()
    logits, labels = np.zeros((3, 4), np.float32), np.array([0, 1, 3])
    out = np.empty_like(logits)
    assert ops.loss(loss, logits, labels, 0.5, out) == 2.5
    assert ops.predict_stats(logits, labels, loss) == (2.5, 1)
    (grid, block, args), (_, _, eval_args) = ops._loss_kernels[(loss, logits.dtype)].calls
    assert grid == (1,) and block == (128,)
    factor = np.float32(0.5) if loss == "cross_entropy" else np.float32(2 * 0.5 / 4)
    _same_args(args[2:], (np.int32(3), np.int32(4), factor, out, np.int32(1), ops._acc))
    assert args[1].dtype == np.int64 and eval_args[6] == 0  # predict_stats writes no gradient
    bad = _cupy_glue_without_gpu(acc=(0.0, 0, 1))
    with pytest.raises(ValueError, match="labels must lie in"):
        bad.loss(loss, logits, labels, 0.5, out)


def test_numba_without_a_writable_cache_says_what_to_do(monkeypatch):
    # a read-only package directory and an unwritable HOME: numba's cache=True fails
    # at import with "no locator available"; the error names the two ways out
    import sys

    class Unwritable:
        def __getattr__(self, name):
            raise RuntimeError("cannot cache function 'bias_act': no locator available for "
                               "file '/usr/lib/mpnn/kernels/numba_ops.py'")

    monkeypatch.setitem(sys.modules, "mpnn.kernels.numba_ops", Unwritable())
    with pytest.raises(RuntimeError, match="set NUMBA_CACHE_DIR to a writable directory, or "
                                           "use --backend numpy"):
        get_ops("numba")
