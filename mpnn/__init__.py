"""mpnn: parallel MLP training from first principles (NumPy + MPI)."""

__version__ = "0.1.0"
