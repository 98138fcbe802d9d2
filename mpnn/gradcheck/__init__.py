"""Gradient check of every layer, loss and the whole model, in float64 and float32.

    python -m mpnn.gradcheck [--seed 0] [--backend numpy] [--eps 1e-6]

Two sections, one table, one verdict (exit status 0, or 1 if any row fails).

**float64 against central differences.** Each backward is compared with
central finite differences of a scalar:

* a layer or activation ``y = f(x)`` is projected on a random upstream
  gradient ``dy``, so one scalar ``φ(x) = ⟨dy, f(x)⟩`` checks the whole
  Jacobian-vector product its backward computes: ``∂φ/∂x = backward(dy)``;
* a loss is already a scalar: ``scale · loss_sum`` with ``scale = 1/B``;
* the model is checked through its own ``forward``/``backward``, the op set
  of ``--backend`` and the flat gradient buffer, with the mean loss on top:
  the 3-layer model at 4, 2 and 1 rows, a model without hidden layers
  (``mlp[none,…]``) and pipeline stages ``layers=range(1, …)`` with and
  without the input gradient (``no_dx``); a stage that stops before the
  last layer has ``⟨dy, h_stop⟩`` on top instead of a loss (``mlp[act,dy]``).

The numerical derivative of one element is ``(φ(x + h) − φ(x − h)) / 2h``,
evaluated as ``⟨dy, f(x + h) − f(x − h)⟩ / 2h`` so that only the outputs the
element moves contribute rounding error. ReLU's kink at 0 is kept out of the
probe: inputs (pre-activations) are redrawn until none lies within
``kink_margin(eps) = max(1e-3, 20·eps)`` of 0, beyond what a step moves them.

**float32 against the float64 reference.** The float32 kernels of a backend
(numpy's own, numba's, CuPy's) get inputs rounded to float32; the float64
NumPy reference, checked above, gets the same rounded values. Any difference
is then float32 arithmetic, nothing else.

The error of one tensor is ``max |a − r| / max(|a|, |r|)`` (∞-norms): the
worst element's error relative to the tensor's scale, so an entry that
happens to be ~0 cannot blow up the ratio. The tolerances follow from the
step and the dtype (``fd_tolerance``, ``f32_tolerance``; derivation in
``docs/derivations.md`` §9). A wrong backward (a missing term, a transposed
factor, a lost scale) lands near 1, and 1% off is still 10× above every
tolerance at every accepted ``--eps``.


The package, by concept:

* ``finite_differences`` — the step, tolerances, ``rel_error``, ``numerical_grad``,
  the ReLU kink margin; the ``functional.py`` and op set checks;
* ``models`` — the whole model and pipeline stages;
* ``float32`` — float32 kernels against the float64 reference, and which backends;
* ``report`` — ``Result`` (one tensor) and ``format_table``;
* ``cli`` — ``check_all`` (every section, in table order) and ``main``.

Shapes: B rows, I in features, O out features, C classes, K a reduction length.
"""

from .cli import check_all, main
from .finite_differences import (
    DTYPE,
    EPS,
    EPS_RANGE,
    FD_CONSTANTS,
    KINK_MARGIN,
    KINK_STEPS,
    MAX_TOL,
    B,
    C,
    I,
    O,
    check_activation,
    check_linear,
    check_loss,
    check_ops_layer,
    check_ops_loss,
    fd_tolerance,
    kink_margin,
    numerical_grad,
    rel_error,
)
from .float32 import (
    F32_B,
    F32_ELEMENTWISE,
    F32_I,
    F32_MODEL_CHECKS,
    F32_O,
    F32_SIZES,
    U32,
    check_f32_layer,
    check_f32_loss,
    check_f32_model,
    check_float32,
    f32_tolerance,
    float32_backends,
)
from .models import MODEL_SIZES, ROW_CHECKS, STAGE_CHECKS, check_model, check_models
from .report import Result, format_table

__all__ = [
    # tolerances and the error of one tensor
    "DTYPE", "EPS", "EPS_RANGE", "FD_CONSTANTS", "KINK_MARGIN", "KINK_STEPS", "MAX_TOL",
    "U32", "F32_ELEMENTWISE", "fd_tolerance", "f32_tolerance", "kink_margin",
    "rel_error", "numerical_grad", "Result",
    # problem sizes and the cases checked
    "B", "I", "O", "C", "MODEL_SIZES", "ROW_CHECKS", "STAGE_CHECKS",
    "F32_B", "F32_I", "F32_O", "F32_SIZES", "F32_MODEL_CHECKS",
    # the checks, in table order
    "check_linear", "check_activation", "check_loss", "check_ops_layer", "check_ops_loss",
    "check_model", "check_models",
    "check_f32_layer", "check_f32_loss", "check_f32_model", "check_float32",
    "float32_backends", "check_all",
    # the report and the command line
    "format_table", "main",
]
