"""One small op set, several implementations.

``base.OpSet`` is the interface: every op with its shapes and equation, and
the glue all backends share (loss-name and label checks, Adam's per-step
scalars, the host no-ops). ``numpy_ops.NumpyOps`` is the readable reference
and the specification; ``numba_ops.NumbaOps`` (CPU) and ``cupy_ops.CupyOps``
(GPU) implement the same interface and are tested against it.
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
        try:
            from .numba_ops import NumbaOps
        except RuntimeError as e:  # numba compiles with cache=True: it needs a writable place
            if "cannot cache" not in str(e):
                raise
            raise RuntimeError(f"{e}. numba keeps its compiled kernels next to the package or "
                               f"in your home directory, and can write to neither here: set "
                               f"NUMBA_CACHE_DIR to a writable directory, or use --backend "
                               f"numpy") from None
        return NumbaOps()
    if name == "cupy":
        from .cupy_ops import CupyOps

        return CupyOps()
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
