#!/usr/bin/env bash
# The whole test suite: the serial pass, then the MPI tests at 2 and 4 ranks.
# This is the README's test command (after set-up), .ci/run's and the Dockerfile's.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -m "not mpi" "$@"
mpirun -n 2 python -m pytest --with-mpi -m mpi -p no:cacheprovider "$@"
mpirun -n 4 python -m pytest --with-mpi -m mpi -p no:cacheprovider "$@"
