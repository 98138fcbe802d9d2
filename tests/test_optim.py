"""Optimizer steps against numbers worked out by hand.

The buffer is a real 3-element FlatParams (one linear layer 2 -> 1: W (2, 1),
b (1,)). The expected values are the update equations evaluated by hand for
each element and written as literal arithmetic; the optimizer is not
re-implemented here. Float64 buffers for the hand values, float32 for dtype.
"""

import math

import numpy as np
import pytest

from mpnn.kernels import get_ops
from mpnn.nn.optim import SGD, Adam, make_optimizer
from mpnn.nn.params import FlatParams, Layout

OPS = get_ops("numpy")
P0 = [1.0, -2.0, 0.5]
GRADS = [[0.5, -1.0, 2.0],  # gradient seen at step 1
         [0.25, 0.5, -1.0],  # step 2
         [-1.0, 0.0, 0.5]]  # step 3


def flat(dtype=np.float64, p=P0):
    f = FlatParams(Layout([2, 1]), dtype)
    assert f.data.size == 3
    f.data[...] = p
    return f


def run(opt, f, steps):
    out = []
    for g in GRADS[:steps]:
        f.grad[...] = g
        opt.step()
        out.append(f.data.copy())
    return out


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------- SGD


def test_sgd():
    f = flat()
    p1, p2, p3 = run(SGD(f, OPS, lr=0.1), f, 3)
    close(p1, [1.0 - 0.1 * 0.5, -2.0 - 0.1 * -1.0, 0.5 - 0.1 * 2.0])  # [0.95, -1.9, 0.3]
    close(p2, [0.95 - 0.1 * 0.25, -1.9 - 0.1 * 0.5, 0.3 - 0.1 * -1.0])  # [0.925, -1.95, 0.4]
    close(p3, [0.925 - 0.1 * -1.0, -1.95 - 0.1 * 0.0, 0.4 - 0.1 * 0.5])  # [1.025, -1.95, 0.35]


def test_sgd_weight_decay():
    f = flat()
    p1, p2 = run(SGD(f, OPS, lr=0.1, weight_decay=0.1), f, 2)
    # g' = g + 0.1·p
    close(p1, [1.0 - 0.1 * (0.5 + 0.1), -2.0 - 0.1 * (-1.0 - 0.2), 0.5 - 0.1 * (2.0 + 0.05)])
    # p1 = [0.94, -1.88, 0.295]
    close(p2, [0.94 - 0.1 * (0.25 + 0.094), -1.88 - 0.1 * (0.5 - 0.188),
               0.295 - 0.1 * (-1.0 + 0.0295)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_sgd_is_exactly_w_minus_lr_g(dtype):
    rng = np.random.default_rng(0)
    f = FlatParams(Layout([7, 5, 3]), dtype)
    f.data[...] = rng.normal(size=f.data.size)
    f.grad[...] = rng.normal(size=f.data.size)
    expected = f.data.copy()
    expected -= 0.01 * f.grad  # the contract of --optimizer sgd --momentum 0
    opt = make_optimizer("sgd", f, OPS, lr=0.01, momentum=0.0)
    assert opt.velocity is None
    opt.step()
    np.testing.assert_array_equal(f.data, expected)


# -------------------------------------------------------------- momentum


def test_momentum():
    f = flat()
    opt = SGD(f, OPS, lr=0.1, momentum=0.9)
    p1, p2, p3 = run(opt, f, 3)
    # v1 = g1 = [0.5, -1.0, 2.0]
    close(p1, [1.0 - 0.1 * 0.5, -2.0 - 0.1 * -1.0, 0.5 - 0.1 * 2.0])  # [0.95, -1.9, 0.3]
    # v2 = 0.9·v1 + g2 = [0.45 + 0.25, -0.9 + 0.5, 1.8 - 1.0] = [0.7, -0.4, 0.8]
    close(p2, [0.95 - 0.1 * 0.7, -1.9 - 0.1 * -0.4, 0.3 - 0.1 * 0.8])  # [0.88, -1.86, 0.22]
    # v3 = 0.9·v2 + g3 = [0.63 - 1.0, -0.36 + 0.0, 0.72 + 0.5] = [-0.37, -0.36, 1.22]
    close(p3, [0.88 - 0.1 * -0.37, -1.86 - 0.1 * -0.36, 0.22 - 0.1 * 1.22])
    close(opt.velocity, [-0.37, -0.36, 1.22])


def test_nesterov():
    f = flat()
    p1, p2 = run(SGD(f, OPS, lr=0.1, momentum=0.9, nesterov=True), f, 2)
    # PyTorch convention: v = μv + g;  p -= lr·(g + μv)
    # step 1: v1 = [0.5, -1.0, 2.0];  g1 + 0.9·v1 = [0.95, -1.9, 3.8]
    close(p1, [1.0 - 0.095, -2.0 + 0.19, 0.5 - 0.38])  # [0.905, -1.81, 0.12]
    # step 2: v2 = [0.7, -0.4, 0.8];  g2 + 0.9·v2 = [0.25 + 0.63, 0.5 - 0.36, -1.0 + 0.72]
    close(p2, [0.905 - 0.1 * 0.88, -1.81 - 0.1 * 0.14, 0.12 - 0.1 * -0.28])


def test_momentum_weight_decay():
    f = flat()
    p1, p2 = run(SGD(f, OPS, lr=0.1, momentum=0.9, weight_decay=0.1), f, 2)
    # step 1: g' = g1 + 0.1·p0 = [0.6, -1.2, 2.05] = v1
    close(p1, [1.0 - 0.06, -2.0 + 0.12, 0.5 - 0.205])  # [0.94, -1.88, 0.295]
    # step 2: g' = g2 + 0.1·p1 = [0.344, 0.312, -0.9705]
    #         v2 = 0.9·v1 + g' = [0.54 + 0.344, -1.08 + 0.312, 1.845 - 0.9705]
    close(p2, [0.94 - 0.1 * 0.884, -1.88 - 0.1 * -0.768, 0.295 - 0.1 * 0.8745])


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="momentum"):
        SGD(flat(), OPS, lr=0.1, momentum=0.0, nesterov=True)


# ----------------------------------------------------------------- AdamW

# Adam, lr 0.1, β1 0.9, β2 0.999, ε 1e-8. Step 1: m = 0.1·g1, v = 0.001·g1²,
# bias corrections 1 − 0.9 = 0.1 and 1 − 0.999 = 0.001, so m̂ = g1, v̂ = g1²,
# and the update is g1 / (|g1| + ε).
ADAM_U1 = [0.5 / (0.5 + 1e-8), -1.0 / (1.0 + 1e-8), 2.0 / (2.0 + 1e-8)]
# Step 2: m2 = 0.9·m1 + 0.1·g2 = 0.09·g1 + 0.1·g2
#           = [0.045 + 0.025, -0.09 + 0.05, 0.18 - 0.1] = [0.07, -0.04, 0.08]
#         v2 = 0.999·v1 + 0.001·g2² = 0.000999·g1² + 0.001·g2²
#           = [0.00024975 + 0.0000625, 0.000999 + 0.00025, 0.003996 + 0.001]
#         corrections 1 − 0.9² = 0.19 and 1 − 0.999² = 0.001999.
ADAM_U2 = [(0.07 / 0.19) / (math.sqrt(0.00031225 / 0.001999) + 1e-8),
           (-0.04 / 0.19) / (math.sqrt(0.001249 / 0.001999) + 1e-8),
           (0.08 / 0.19) / (math.sqrt(0.004996 / 0.001999) + 1e-8)]


def test_adam():
    f = flat()
    opt = Adam(f, OPS, lr=0.1)
    p1, p2 = run(opt, f, 2)
    p1_expected = [1.0 - 0.1 * ADAM_U1[0], -2.0 - 0.1 * ADAM_U1[1], 0.5 - 0.1 * ADAM_U1[2]]
    close(p1, p1_expected)
    close(p2, [p1_expected[k] - 0.1 * ADAM_U2[k] for k in range(3)])
    close(opt.m, [0.07, -0.04, 0.08])
    close(opt.v, [0.00031225, 0.001249, 0.004996])


def test_adamw_decoupled_weight_decay():
    f = flat()
    opt = Adam(f, OPS, lr=0.1, weight_decay=0.1)
    p1, p2 = run(opt, f, 2)
    # decoupled: p ← p·(1 − lr·wd) − lr·update, the moments never see wd
    p1_expected = [1.0 * 0.99 - 0.1 * ADAM_U1[0], -2.0 * 0.99 - 0.1 * ADAM_U1[1],
                   0.5 * 0.99 - 0.1 * ADAM_U1[2]]
    close(p1, p1_expected)
    close(p2, [p1_expected[k] * 0.99 - 0.1 * ADAM_U2[k] for k in range(3)])
    close(opt.m, [0.07, -0.04, 0.08])


# ------------------------------------------------------------------ dtype


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", {}), ("sgd", {"weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {}), ("adam", {"weight_decay": 0.01}),
])
def test_float32_stays_float32(name, kwargs):
    f = flat(np.float32)
    data_before = f.data
    opt = make_optimizer(name, f, OPS, lr=np.float64(0.1), **kwargs)  # a float64 lr, too
    for g in GRADS:
        f.grad[...] = g
        opt.step(lr=np.float64(0.05))
    assert f.data is data_before and f.data.dtype == np.float32  # updated in place
    for state in opt.state().values():
        assert state.dtype == np.float32
    # and the result is the float32 computation, not float64 rounded at the end
    f64 = flat(np.float64)
    opt64 = make_optimizer(name, f64, OPS, lr=0.1, **kwargs)
    for g in GRADS:
        f64.grad[...] = g
        opt64.step(lr=0.05)
    np.testing.assert_allclose(f.data, f64.data, rtol=1e-6, atol=1e-6)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", flat(), OPS, lr=0.1)


# -------------------------------------------------- independent reference


@pytest.mark.parametrize("kind", ["momentum", "nesterov", "adamw"])
def test_steps_match_torch(kind):
    torch = pytest.importorskip("torch", reason="torch not installed")
    rng = np.random.default_rng(2)
    p0 = rng.normal(size=10)
    grads = rng.normal(size=(4, 10))
    f = FlatParams(Layout([4, 2]), np.float64)  # 4·2 + 2 = 10 elements
    f.data[...] = p0
    tp = torch.tensor(p0.copy(), requires_grad=True)
    if kind == "adamw":
        ours = Adam(f, OPS, lr=0.01, weight_decay=0.1)
        ref = torch.optim.AdamW([tp], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    else:
        nesterov = kind == "nesterov"
        ours = SGD(f, OPS, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
        ref = torch.optim.SGD([tp], lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    for g in grads:
        f.grad[...] = g
        ours.step()
        tp.grad = torch.tensor(g.copy())
        ref.step()
    np.testing.assert_allclose(f.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
