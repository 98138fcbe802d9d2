"""What runs around the math: the training loop, setup, checkpoints, guards, files, traces,
threads."""
