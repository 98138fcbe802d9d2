"""Failure is loud and collective: every rank agrees on an outcome, or the job aborts.

    on_every_rank(comm, step, prog)   before the first collective of training: run
                                      ``step`` everywhere, then agree; a failure on any
                                      rank ends every rank with one message, status 2
    abort_on_error(comm, run, prog)   during training: an exception on any rank prints
                                      its message and ends the whole job (MPI_Abort,
                                      status 1) instead of leaving the others waiting
    interrupted(comm, prog)           Ctrl-C: ends every rank with status 130
"""

from __future__ import annotations

import sys


def on_every_rank(comm, step, prog="mpnn.train"):
    """Run ``step()`` on every rank of ``comm`` and agree on the outcome.

    Returns (None, result) when it succeeded everywhere. Otherwise rank 0
    prints each distinct message once (naming the ranks when not all failed)
    and every rank gets (exit status, None): the job ends together instead of
    some ranks waiting in a collective the failed ones never reach.
    """
    error, result = None, None
    try:
        result = step()
    except SystemExit as e:  # argparse already printed usage and the problem
        error = e.code or 0
    except Exception as e:  # noqa: BLE001 - reported to the user, then exit
        error = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, OSError)) else str(e)
    errors = comm.allgather(error) if comm.Get_size() > 1 else [error]
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return None, result
    codes = [e for _, e in failed if isinstance(e, int)]
    if len(codes) == len(failed):
        return max(codes), None
    if comm.Get_rank() == 0:
        messages = {}
        for r, e in failed:
            if not isinstance(e, int):
                messages.setdefault(e, []).append(r)
        for message, ranks in messages.items():
            where = "" if len(failed) == len(errors) else f" (rank {', '.join(map(str, ranks))})"
            print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)
    return 2, None


def abort_on_error(comm, run, prog="mpnn.train"):
    """``run()``; on an exception print it (naming the rank) and end the job: status 1."""
    try:
        run()
    except Exception as e:  # noqa: BLE001
        print(f"{prog}: error on rank {comm.Get_rank()}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            comm.Abort(1)
        return 1
    return 0


def interrupted(comm, prog="mpnn.train"):
    """After Ctrl-C (mpirun passes it to every rank): say so and end every rank, 130."""
    print(f"{prog}: interrupted on rank {comm.Get_rank()}; ending the job (checkpoints "
          f"already written stay)", file=sys.stderr, flush=True)
    if comm.Get_size() > 1:
        comm.Abort(130)  # a rank waiting in a collective would never hear of it
    return 130
