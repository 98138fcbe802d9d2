"""Finite-difference checks and independent reference values for mpnn.functional.

Everything gradient-related runs in float64. The FD helper here is a few lines
of its own (not mpnn.gradcheck's), so the two checks do not share a bug.
"""

import math
import warnings

import numpy as np
import pytest

from mpnn.nn import functional as F

B, I, O, C = 4, 5, 3, 6


def fd_grad(f, x, dy=None, eps=1e-6):
    """Central differences of ⟨dy, f()⟩ (or scalar f()) with respect to x, perturbed in place."""
    g = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        orig = x[idx]
        x[idx] = orig + eps
        fp = np.array(f(), dtype=np.float64)
        x[idx] = orig - eps
        fm = np.array(f(), dtype=np.float64)
        x[idx] = orig
        d = fp - fm
        g[idx] = (d if dy is None else np.sum(dy * d)) / (2 * eps)
    return g


def assert_grad_close(analytic, numeric, tol=1e-7):
    scale = max(np.abs(analytic).max(), np.abs(numeric).max(), 1e-12)
    err = np.abs(analytic - numeric).max() / scale
    assert err < tol, f"relative gradient error {err:.2e} exceeds {tol:.0e}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------- linear


def test_linear_forward_value(rng):
    x, W, b = rng.normal(size=(B, I)), rng.normal(size=(I, O)), rng.normal(size=O)
    y, _ = F.linear_forward(x, W, b)
    expected = np.array([[sum(x[r, i] * W[i, o] for i in range(I)) + b[o] for o in range(O)]
                         for r in range(B)])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["dx", "dW", "db"])
def test_linear_backward_fd(rng, which):
    x, W, b = rng.normal(size=(B, I)), rng.normal(size=(I, O)), rng.normal(size=O)
    dy = rng.normal(size=(B, O))
    _, cache = F.linear_forward(x, W, b)
    grads = dict(zip(("dx", "dW", "db"), F.linear_backward(dy, cache), strict=True))
    target = {"dx": x, "dW": W, "db": b}[which]
    assert grads[which].shape == target.shape
    num = fd_grad(lambda: F.linear_forward(x, W, b)[0].copy(), target, dy)
    assert_grad_close(grads[which], num)


# -------------------------------------------------------------- activations


def _act_input(rng, name):
    z = rng.normal(scale=1.5, size=(B, O))
    if name == "relu":  # keep every input at least 0.1 away from the kink
        z = np.sign(z) * (np.abs(z) + 0.1)
    return z


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid", "identity"])
def test_activation_backward_fd(rng, name):
    forward, backward = F.ACTIVATIONS[name]
    z = _act_input(rng, name)
    dy = rng.normal(size=z.shape)
    _, cache = forward(z)
    dz = backward(dy, cache)
    assert dz.shape == z.shape
    num = fd_grad(lambda: np.array(forward(z)[0], copy=True), z, dy)
    assert_grad_close(dz, num)


def test_activation_values():
    z = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    np.testing.assert_array_equal(F.relu_forward(z)[0], [[0, 0, 0, 0.5, 3.0]])
    np.testing.assert_allclose(F.tanh_forward(z)[0], [[math.tanh(v) for v in z[0]]], rtol=1e-15)
    np.testing.assert_allclose(F.sigmoid_forward(z)[0],
                               [[1 / (1 + math.exp(-v)) for v in z[0]]], rtol=1e-15)
    assert F.identity_forward(z)[0] is z


def test_relu_subgradient_at_zero_is_zero():
    z = np.array([[0.0, -0.0, 1.0]])
    y, cache = F.relu_forward(z)
    np.testing.assert_array_equal(F.relu_backward(np.ones_like(z), cache), [[0, 0, 1]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_extreme_inputs_no_overflow(dtype):
    z = np.array([[-1e4, -800.0, 0.0, 800.0, 1e4]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would raise here
        y, _ = F.sigmoid_forward(z)
    assert y.dtype == dtype
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-30)


# ------------------------------------------------------------------- losses


def lse_reference(z):
    """log Σ exp(z) per row by np.logaddexp.reduce (pairwise, never overflows)."""
    return np.array([np.logaddexp.reduce(row) for row in z])


def test_softmax_ce_value_matches_textbook_formula(rng):
    z = rng.normal(size=(B, C))
    labels = rng.integers(0, C, size=B)
    loss, _ = F.softmax_cross_entropy(z, labels)
    expected = sum(-math.log(math.exp(z[r, labels[r]]) / sum(math.exp(v) for v in z[r]))
                   for r in range(B))
    assert loss == pytest.approx(expected, rel=1e-13)
    assert isinstance(loss, float)


def test_softmax_ce_gradient_fd(rng):
    z = rng.normal(scale=2.0, size=(B, C))
    labels = rng.integers(0, C, size=B)
    _, dz = F.softmax_cross_entropy(z, labels)
    num = fd_grad(lambda: F.softmax_cross_entropy(z, labels)[0], z)
    assert_grad_close(dz, num)


def test_softmax_ce_gradient_is_p_minus_onehot(rng):
    z = rng.normal(size=(B, C))
    labels = rng.integers(0, C, size=B)
    _, dz = F.softmax_cross_entropy(z, labels)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dz, p - F.one_hot(labels, C, np.float64), atol=1e-15)
    np.testing.assert_allclose(dz.sum(axis=1), 0, atol=1e-15)  # rows of p − onehot sum to 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_ce_extreme_logits_stay_finite(dtype):
    z = np.array([[1e4, -1e4, 0.0, 5.0],
                  [-1e4, 1e4, 1e4, -1e4],
                  [-1e4, -1e4, -1e4, -1e4],
                  [3.0, 1e4, -2.0, 1e4 - 1.0]], dtype=dtype)
    labels = np.array([1, 2, 0, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, dz = F.softmax_cross_entropy(z, labels)
    assert math.isfinite(loss) and np.all(np.isfinite(dz))
    assert dz.dtype == dtype
    z64 = z.astype(np.float64)
    lse = lse_reference(z64)
    expected = float(np.sum(lse - z64[np.arange(4), labels]))
    assert loss == pytest.approx(expected, rel=1e-6 if dtype == np.float32 else 1e-13)
    p = np.exp(z64 - lse[:, None])
    np.testing.assert_allclose(dz, p - F.one_hot(labels, 4, np.float64),
                               atol=1e-6 if dtype == np.float32 else 1e-15)


def test_mse_value_matches_loops(rng):
    pred, target = rng.normal(size=(B, C)), rng.normal(size=(B, C))
    loss, _ = F.mse(pred, target)
    expected = 0.0
    for r in range(B):
        expected += sum((pred[r, c] - target[r, c]) ** 2 for c in range(C)) / C
    assert loss == pytest.approx(expected, rel=1e-13)


def test_mse_gradient_fd(rng):
    pred, target = rng.normal(size=(B, C)), rng.normal(size=(B, C))
    _, dpred = F.mse(pred, target)
    num = fd_grad(lambda: F.mse(pred, target)[0], pred)
    assert_grad_close(dpred, num)


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_scale_multiplies_gradient_not_loss(rng, loss_name):
    z = rng.normal(size=(B, C))
    labels = rng.integers(0, C, size=B)
    target = labels if loss_name == "cross_entropy" else F.one_hot(labels, C, np.float64)
    fn = F.LOSSES[loss_name]
    loss1, d1 = fn(z, target, 1.0)
    loss_s, d_s = fn(z, target, 1 / 37)
    assert loss_s == loss1  # the loss is always the plain sum over rows
    np.testing.assert_allclose(d_s, d1 / 37, rtol=1e-15)
    # and it is the gradient of scale·sum, the mean over a global batch of 37
    num = fd_grad(lambda: fn(z, target, 1 / 37)[0] / 37, z)
    assert_grad_close(d_s, num)


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_loss_keeps_float32(loss_name):
    z = np.linspace(-3, 3, B * C, dtype=np.float32).reshape(B, C)
    labels = np.arange(B) % C
    target = labels if loss_name == "cross_entropy" else F.one_hot(labels, C)
    _, d = F.LOSSES[loss_name](z, target, 1 / 3)
    assert d.dtype == np.float32


def test_one_hot():
    out = F.one_hot(np.array([2, 0, 1]), 4, np.float64)
    np.testing.assert_array_equal(out, [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
    assert F.one_hot(np.array([0]), 2).dtype == np.float32
