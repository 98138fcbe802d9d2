"""MPI parallelism: the process grid, gradient Allreduce, pipeline schedules and their executor."""
