"""The MLP over flat buffers: gradients, layer ranges, accumulation, the batch
scale, weights I/O, initialisation, and the numpy op set against functional.py."""

import numpy as np
import pytest

from mpnn.kernels import get_ops
from mpnn.nn import functional as F
from mpnn.nn.model import MLP, Context

SIZES = [6, 7, 5, 4]  # three linear layers
OPS = get_ops("numpy")


def loss_and_grad(model, x, labels, loss="cross_entropy", scale=None, ctx=None):
    """Forward, loss with scale (default 1/B), backward into model.flat.grad (not zeroed)."""
    scale = 1.0 / x.shape[0] if scale is None else scale
    ctx = ctx or Context()
    logits = model.forward(x, ctx)
    d = np.empty_like(logits)
    loss_sum = OPS.loss(loss, logits, labels, scale, d)
    model.backward(d, ctx)
    return scale * loss_sum


def mean_loss(model, x, labels, loss):
    logits = model.forward(x, Context())
    d = np.empty_like(logits)
    return OPS.loss(loss, logits, labels, 1.0, d) / x.shape[0]


def data(rng, n, sizes=SIZES, dtype=np.float64):
    x = rng.normal(size=(n, sizes[0])).astype(dtype)
    labels = rng.integers(0, sizes[-1], size=n)
    return x, labels


# ------------------------------------------------------------- gradients


@pytest.mark.parametrize("activation,loss", [("relu", "cross_entropy"), ("tanh", "mse"),
                                             ("sigmoid", "cross_entropy"), ("identity", "mse")])
def test_gradient_equals_fd_of_mean_loss(activation, loss):
    rng = np.random.default_rng(7)
    model = MLP(SIZES, activation, dtype=np.float64, seed=3)
    model.flat.data[...] += rng.normal(scale=0.1, size=model.flat.data.shape)  # nonzero biases
    x, labels = data(rng, 5)
    model.zero_grad()
    loss_and_grad(model, x, labels, loss)
    analytic = model.flat.grad.copy()
    eps, numeric = 1e-6, np.zeros_like(analytic)
    p = model.flat.data
    for k in range(p.size):
        orig = p[k]
        p[k] = orig + eps
        lp = mean_loss(model, x, labels, loss)
        p[k] = orig - eps
        lm = mean_loss(model, x, labels, loss)
        p[k] = orig
        numeric[k] = (lp - lm) / (2 * eps)
    err = np.abs(analytic - numeric).max() / np.abs(numeric).max()
    assert err < 1e-6, f"{activation}/{loss}: relative error {err:.1e}"


def test_input_gradient_matches_fd():
    rng = np.random.default_rng(11)
    model = MLP(SIZES, "tanh", dtype=np.float64, seed=1)
    x, labels = data(rng, 3)
    ctx = Context()
    logits = model.forward(x, ctx)
    d = np.empty_like(logits)
    OPS.loss("cross_entropy", logits, labels, 1 / 3, d)
    dx = model.backward(d, ctx, need_input_grad=True).copy()
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        orig = x[idx]
        x[idx] = orig + 1e-6
        lp = mean_loss(model, x, labels, "cross_entropy")
        x[idx] = orig - 1e-6
        lm = mean_loss(model, x, labels, "cross_entropy")
        x[idx] = orig
        numeric[idx] = (lp - lm) / 2e-6
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-9)


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(0)
    model = MLP(SIZES, "relu", dtype=np.float64, seed=0)
    x, labels = data(rng, 8)
    model.zero_grad()
    loss_and_grad(model, x, labels)
    once = model.flat.grad.copy()
    assert np.abs(once).max() > 0
    loss_and_grad(model, x, labels)
    np.testing.assert_allclose(model.flat.grad, 2 * once, rtol=1e-14, atol=1e-16)
    model.zero_grad()
    assert not model.flat.grad.any()


def test_micro_batches_with_global_scale_sum_to_full_batch_gradient():
    rng = np.random.default_rng(5)
    model = MLP(SIZES, "tanh", dtype=np.float64, seed=2)
    x, labels = data(rng, 10)
    model.zero_grad()
    full_loss = loss_and_grad(model, x, labels, scale=1 / 10)
    full = model.flat.grad.copy()
    model.zero_grad()
    parts_loss = 0.0
    for rows in (slice(0, 3), slice(3, 6), slice(6, 10)):  # uneven, like a last partial share
        parts_loss += loss_and_grad(model, x[rows], labels[rows], scale=1 / 10)
    assert np.abs(model.flat.grad - full).max() <= 1e-12
    assert parts_loss == pytest.approx(full_loss, abs=1e-12)


def test_on_layer_done_called_in_reverse_with_final_gradients():
    rng = np.random.default_rng(0)
    model = MLP(SIZES, "relu", dtype=np.float64)
    x, labels = data(rng, 4)
    seen = {}
    ctx = Context()
    logits = model.forward(x, ctx)
    d = np.empty_like(logits)
    OPS.loss("cross_entropy", logits, labels, 0.25, d)
    model.zero_grad()
    model.backward(d, ctx, on_layer_done=lambda i: seen.setdefault(i, model.flat.grad.copy()))
    assert list(seen) == [2, 1, 0]
    for i, snapshot in seen.items():
        lo, hi = model.layout.layer_span(i)
        np.testing.assert_array_equal(snapshot[lo:hi], model.flat.grad[lo:hi])


# ---------------------------------------------------------- layer ranges


def test_layer_range_starts_from_serial_weights():
    serial = MLP(SIZES, "relu", seed=42)
    for a, b in [(0, 1), (1, 3), (2, 3), (0, 3)]:
        stage = MLP(SIZES, "relu", seed=42, layers=range(a, b))
        assert list(stage.state_dict()) == [f"layers.{i}.{t}" for i in range(a, b)
                                            for t in ("weight", "bias")]
        for name, w in stage.state_dict().items():
            np.testing.assert_array_equal(w, serial.state_dict()[name])
    other = MLP(SIZES, "relu", seed=43)
    assert not np.array_equal(other.W(0), serial.W(0))


def test_stages_chain_to_serial_forward_and_backward():
    rng = np.random.default_rng(9)
    x, labels = data(rng, 6)
    serial = MLP(SIZES, "sigmoid", dtype=np.float64, seed=4)
    first = MLP(SIZES, "sigmoid", dtype=np.float64, seed=4, layers=range(0, 2))
    last = MLP(SIZES, "sigmoid", dtype=np.float64, seed=4, layers=range(2, 3))
    serial.zero_grad(), first.zero_grad(), last.zero_grad()
    loss_and_grad(serial, x, labels)

    c0, c1 = Context(), Context()
    h = first.forward(x, c0).copy()  # what would be sent to the next stage
    logits = last.forward(h, c1)
    np.testing.assert_allclose(logits, serial.forward(x, Context()), rtol=1e-14, atol=1e-15)
    d = np.empty_like(logits)
    OPS.loss("cross_entropy", logits, labels, 1 / 6, d)
    dh = last.backward(d, c1, need_input_grad=True).copy()  # what would be sent back
    assert first.backward(dh, c0) is None
    for stage in (first, last):
        for name, g in stage.flat.grads.items():
            np.testing.assert_allclose(g, serial.flat.grads[name], rtol=1e-13, atol=1e-16)


# --------------------------------------------------------- weights I/O


def test_state_dict_round_trip_and_format():
    src = MLP(SIZES, "relu", seed=1)
    sd = src.state_dict()
    assert sd["layers.0.weight"].shape == (6, 7) and sd["layers.2.bias"].shape == (4,)
    dst = MLP(SIZES, "relu", seed=2)
    dst.load_state_dict(sd)
    np.testing.assert_array_equal(dst.flat.data, src.flat.data)
    sd["layers.0.weight"][...] = 0  # state_dict returns copies
    assert src.W(0).any()


def test_load_state_dict_shape_mismatch_is_a_clear_value_error():
    model = MLP(SIZES, "relu")
    sd = model.state_dict()
    sd["layers.1.weight"] = np.zeros((7, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"layers\.1\.weight has shape \(7, 6\).*needs \(7, 5\)"):
        model.load_state_dict(sd, source="ckpt.npz")
    with pytest.raises(ValueError, match=r"ckpt\.npz"):
        model.load_state_dict(sd, source="ckpt.npz")
    del sd["layers.2.bias"]
    with pytest.raises(ValueError, match=r"missing layers\.2\.bias"):
        model.load_state_dict(sd)


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(SIZES, "gelu")
    with pytest.raises(ValueError, match="sizes"):
        MLP([5])
    with pytest.raises(ValueError, match="sizes"):
        MLP([5, 0, 3])
    for bad in (range(-1, 2), range(2, 4), range(1, 1), range(0, 3, 2)):
        with pytest.raises(ValueError, match="layers must be range"):
            MLP(SIZES, layers=bad)


# ------------------------------------------------------------------ init


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
def test_init_statistics(activation):
    sizes = [400, 300, 200]
    model = MLP(sizes, activation, seed=0)
    for i in range(2):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        he = activation == "relu" and i == 0  # the output layer is always Glorot
        expected = np.sqrt(2 / fan_in) if he else np.sqrt(2 / (fan_in + fan_out))
        W = model.W(i)
        assert W.dtype == np.float32
        assert abs(W.mean()) < 0.02 * expected * 10  # mean ~0 (n ≥ 60 000)
        assert W.std() == pytest.approx(expected, rel=0.02)
        assert not model.b(i).any()


def test_init_is_deterministic_per_seed():
    a, b = MLP(SIZES, seed=5), MLP(SIZES, seed=5)
    np.testing.assert_array_equal(a.flat.data, b.flat.data)
    f64 = MLP(SIZES, seed=5, dtype=np.float64)
    np.testing.assert_array_equal(f64.flat.data.astype(np.float32), a.flat.data)


def test_float32_model_stays_float32():
    rng = np.random.default_rng(0)
    model = MLP(SIZES, "relu", dtype=np.float32)
    x, labels = data(rng, 4, dtype=np.float32)
    ctx = Context()
    logits = model.forward(x, ctx)
    d = np.empty_like(logits)
    OPS.loss("cross_entropy", logits, labels, 0.25, d)
    dx = model.backward(d, ctx, need_input_grad=True)
    assert logits.dtype == d.dtype == dx.dtype == model.flat.grad.dtype == np.float32


# ------------------------------------------------- numpy op set vs functional


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "identity"])
def test_numpy_ops_layer_match_functional(act):
    rng = np.random.default_rng(3)
    x, W, b = rng.normal(size=(4, 5)), rng.normal(size=(5, 3)), rng.normal(size=3)
    dy = rng.normal(size=(4, 3))
    fwd, bwd = F.ACTIVATIONS[act]
    z, lin_cache = F.linear_forward(x, W, b)
    y_ref, act_cache = fwd(z)
    dz_ref = bwd(dy, act_cache)
    dx_ref, dW_ref, db_ref = F.linear_backward(dz_ref, lin_cache)

    y = OPS.linear_act(x, W, b, act, np.empty((4, 3)))
    np.testing.assert_allclose(y, y_ref, rtol=1e-15, atol=1e-15)
    db, dW = np.full(3, 1.0), np.full((5, 3), 2.0)  # ops accumulate into these
    dz = OPS.act_bias_backward(dy.copy(), y, act, db)
    OPS.weight_grad(x, dz, dW)
    dx = OPS.input_grad(dz, W, np.empty((4, 5)))
    np.testing.assert_allclose(dz, dz_ref, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(db, 1.0 + db_ref, rtol=1e-14)
    np.testing.assert_allclose(dW, 2.0 + dW_ref, rtol=1e-14)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-14)


def test_numpy_ops_losses_match_functional():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    out = np.empty_like(z)
    loss = OPS.loss("cross_entropy", z, labels, 0.2, out)
    ref_loss, ref_d = F.softmax_cross_entropy(z, labels, 0.2)
    assert loss == ref_loss
    np.testing.assert_array_equal(out, ref_d)
    loss = OPS.loss("mse", z, labels, 0.2, out)
    ref_loss, ref_d = F.mse(z, F.one_hot(labels, 4, np.float64), 0.2)
    assert loss == ref_loss
    np.testing.assert_array_equal(out, ref_d)
    loss_sum, correct = OPS.predict_stats(z, labels, "cross_entropy")
    assert loss_sum == pytest.approx(F.softmax_cross_entropy(z, labels)[0])
    assert correct == int((z.argmax(axis=1) == labels).sum())


# -------------------------------------------------- independent reference


def test_mlp_gradient_matches_torch():
    torch = pytest.importorskip("torch", reason="torch not installed")
    rng = np.random.default_rng(8)
    for activation, loss in [("relu", "cross_entropy"), ("tanh", "mse"), ("sigmoid", "mse")]:
        model = MLP(SIZES, activation, dtype=np.float64, seed=6)
        x, labels = data(rng, 7)
        model.zero_grad()
        ours = loss_and_grad(model, x, labels, loss)

        act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]
        params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
                  for k, v in model.state_dict().items()}
        h = torch.tensor(x)
        for i in range(len(SIZES) - 1):
            h = h @ params[f"layers.{i}.weight"] + params[f"layers.{i}.bias"]
            if i < len(SIZES) - 2:
                h = act(h)
        t_labels = torch.tensor(labels)
        if loss == "cross_entropy":
            ref = torch.nn.functional.cross_entropy(h, t_labels)
        else:
            onehot = torch.nn.functional.one_hot(t_labels, SIZES[-1]).to(torch.float64)
            ref = torch.nn.functional.mse_loss(h, onehot)  # mean over B·C = ours
        ref.backward()
        assert ours == pytest.approx(ref.item(), rel=1e-12)
        for name, g in model.flat.grads.items():
            np.testing.assert_allclose(g, params[name].grad.numpy(), rtol=1e-10, atol=1e-14)
