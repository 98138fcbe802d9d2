"""The lessons in mpi_examples/ run standalone and pass their own checks."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "mpi_examples"
MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
RANKS = {  # lesson: the rank counts it is run at
    "allreduce_data_parallel.py": (2, 4),
    "bucketed_allreduce_overlap.py": (2, 4),
    "pipeline_two_stage.py": (2,),
    "rma_lock.py": (3, 4),  # one worker alone never overlaps another
    "shared_memory_allreduce.py": (2, 4),
    "zero_sharded_step.py": (2, 4),
}


def test_every_lesson_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RANKS)


@pytest.mark.parametrize("lesson, ranks", [(name, n) for name, counts in RANKS.items()
                                           for n in counts])
def test_lesson_runs_and_checks_itself(lesson, ranks):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # standalone: no mpnn needed
    p = subprocess.run([MPIRUN, "-n", str(ranks), sys.executable, str(EXAMPLES / lesson)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=EXAMPLES)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and p.stdout.strip(), p.stdout + p.stderr
