"""The math, no MPI: forward/backward pairs, flat buffers, the MLP, optimizers."""
