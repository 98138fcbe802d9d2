"""One small op set, several implementations.

``numpy_ops.NumpyOps`` is the readable reference and the specification; the
other backends implement the same methods and are tested against it.

The op set (every method works on the backend's array type):

    linear_act(x, W, b, act, out)           out = act(x·W + b)                (B, O)
    act_bias_backward(dy, y, act, db)       dz = dy ⊙ act'(y); db += Σ_rows dz (B, O)
    weight_grad(x, dz, dW)                  dW += xᵀ·dz                        (I, O)
    input_grad(dz, W, out)                  out = dz·Wᵀ                        (B, I)
    loss(name, logits, labels, scale, out)  loss_sum, out = scale·dL/dlogits   (B, C)
    predict_stats(logits, labels)           (loss_sum, n_correct) for evaluation
    sgd_step / momentum_step / adam_step    in-place updates of the flat buffers
"""

from __future__ import annotations

BACKENDS = ("auto", "numpy", "numba", "cupy")


def get_ops(name="numpy"):
    """Return the op set called ``name`` (see ``BACKENDS``)."""
    if name == "auto":
        from .cupy_ops import gpu_available

        name = "cupy" if gpu_available() else "numba"
    if name == "numpy":
        from .numpy_ops import NumpyOps

        return NumpyOps()
    if name == "numba":
        from .numba_ops import NumbaOps

        return NumbaOps()
    if name == "cupy":
        from .cupy_ops import CupyOps

        return CupyOps()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
