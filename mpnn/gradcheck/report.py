"""The record of one checked tensor (``Result``) and the table that prints them (``format_table``).

Every check of the package returns a list of ``Result``, one per tensor, in
table order; ``format_table`` groups them by section: functional.py, the op
set (``ops.…``), the model (``mlp[…]``), then float32 per backend (``f32.<backend>.…``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    """The worst relative error of one tensor of one check."""

    check: str  # e.g. "linear", "softmax_cross_entropy", "mlp[relu,mse]"
    tensor: str  # e.g. "dx", "layers.0.weight"
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)  # NaN is not ok


def _section(check):
    """The table section of a check: functional.py, the op set, the model, float32 per backend."""
    if check.startswith("f32."):
        return check.split(".")[1]
    return "ops" if check.startswith("ops.") else "mlp" if check.startswith("mlp[") else ""


def format_table(results):
    """One row per tensor, a blank line between sections, the largest err/tol last."""
    w_check = max(len("check"), *(len(r.check) for r in results))
    w_tensor = max(len("tensor"), *(len(r.tensor) for r in results))
    lines = [f"{'check':<{w_check}}  {'tensor':<{w_tensor}}  {'rel err':>8}  {'tol':>8}  status"]
    for prev, r in zip([None, *results], results, strict=False):
        if prev is not None and _section(prev.check) != _section(r.check):
            lines.append("")
        lines.append(f"{r.check:<{w_check}}  {r.tensor:<{w_tensor}}  {r.error:>8.1e}  "
                     f"{r.tol:>8.1e}  {'ok' if r.ok else 'FAIL'}")
    worst = max(results, key=lambda r: np.inf if np.isnan(r.error) else r.error / r.tol)
    lines.append(f"\nlargest rel err / tol: {worst.error / worst.tol:.2g} "
                 f"({worst.check} {worst.tensor})")
    return "\n".join(lines)
