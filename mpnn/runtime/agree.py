"""Failure is loud and collective: every rank agrees on an outcome, or the job aborts.

    gather_outcome(comm, step)        run ``step`` everywhere, every rank's outcome
    on_every_rank(comm, step, prog)   before the first collective of training: run
                                      ``step`` everywhere, then agree; a failure on any
                                      rank ends every rank with one message, status 2
    abort_on_error(comm, run, prog)   during training: an exception on any rank prints
                                      its message and ends the whole job (MPI_Abort,
                                      status 1) instead of leaving the others waiting
    interrupted(comm, prog)           Ctrl-C: ends every rank with status 130
    abort(comm, code)                 MPI_Abort, then this process's end in any case
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

ABORT_GRACE_S = 0.2  # seconds between the last error line and MPI_Abort
INTERRUPT_GRACE_S = 1.0  # after Ctrl-C, another rank's wait for rank 0 to end the job


def gather_outcome(comm, step, deferred=()):
    """Run ``step()`` here and gather every rank's outcome (collective over ``comm``).

    Returns (errors, result): errors[r] is None where rank r succeeded, an exit
    status where it raised SystemExit (argparse printed the problem), else its
    message; an exception of a ``deferred`` type counts as "" (failed, another
    rank holds the message). ``result`` is this rank's (None if it failed)."""
    error, result = None, None
    try:
        result = step()
    except deferred:
        error = ""
    except SystemExit as e:  # argparse already printed usage and the problem
        error = e.code or 0
    except UnicodeError as e:  # a name the output's encoding cannot show
        error = (f"{type(e).__name__}: {e} (a file name that this output's encoding cannot "
                 f"show: set PYTHONIOENCODING=utf-8:surrogateescape, or rename the file)")
    except Exception as e:  # noqa: BLE001 - reported to the user
        error = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, OSError)) else str(e)
    errors = comm.allgather(error) if comm.Get_size() > 1 else [error]
    return errors, result


def on_every_rank(comm, step, prog="mpnn.train"):
    """Run ``step()`` on every rank of ``comm`` and agree on the outcome.

    Returns (None, result) when it succeeded everywhere. Otherwise rank 0
    prints each distinct message once (naming the ranks when not all failed)
    and every rank gets (exit status, None): the job ends together instead of
    some ranks waiting in a collective the failed ones never reach.
    """
    errors, result = gather_outcome(comm, step)
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


def abort_on_error(comm, run, prog="mpnn.train", release=()):
    """``run()``; on an exception print it (naming the rank) and end the job: status 1.

    release: what this rank holds that must go before MPI_Abort ends the process
    (the checkpoint directory's lock), each with a ``release()``."""
    from .guards import PeerReportedError

    try:
        run()
    except PeerReportedError:  # another rank reports it and aborts the job: wait for that
        comm.Barrier()  # (the reporter never joins)
        return 1
    except Exception as e:  # noqa: BLE001
        say(f"{prog}: error on rank {comm.Get_rank()}: {type(e).__name__}: {e}{_hint(e)}")
        for held in release:  # MPI_Abort skips every finally: free them now
            held.release()
        if comm.Get_size() > 1:
            time.sleep(ABORT_GRACE_S)  # let mpirun's proxy forward the line before the kill
            abort(comm, 1)
        return 1
    return 0


PROGRESS_TIMEOUT = "Progress TIMEOUT"  # MPICH's words when MPIR_CVAR_PROGRESS_TIMEOUT fires


def _hint(error):
    """What an MPI error of a stalled job means, for the message (else "")."""
    if PROGRESS_TIMEOUT.lower() not in str(error).lower():
        return ""
    limit = os.environ.get("MPIR_CVAR_PROGRESS_TIMEOUT", "?")
    return (f"\n{' ' * 4}(an MPI wait made no progress for twice MPIR_CVAR_PROGRESS_TIMEOUT={limit}"
            f" s: another rank, its host or the network between them stopped answering; "
            f"checkpoints already written stay, resume with --resume)")


def say(line):
    """Write one line to stderr at once, whole, past Python's buffers: the job may be
    killed right after (MPI_Abort), memory may be short (MemoryError), and another
    rank's line must not run into this one."""
    text = line.rstrip("\n") + "\n"
    if sys.stderr is not sys.__stderr__:  # redirected (a test capturing it): write there
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = text.encode(errors="backslashreplace")
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def interrupted(comm, prog="mpnn.train"):
    """After Ctrl-C (mpirun passes it to every rank): say so and end every rank, 130.

    Rank 0 ends the job at once; another rank first gives rank 0 ``INTERRUPT_GRACE_S``
    to finish what it was doing (remove a partial download) and end the job itself,
    and ends it only if rank 0 has not (it may sit in an MPI wait, deaf to signals)."""
    say(f"{prog}: interrupted on rank {comm.Get_rank()}; ending the job (checkpoints "
        f"already written stay)")
    if comm.Get_size() > 1:
        if comm.Get_rank() != 0:
            time.sleep(INTERRUPT_GRACE_S)
        abort(comm, 130)  # a rank waiting in a collective would never hear of it
    return 130


def abort(comm, code):
    """``MPI_Abort(comm, code)``, then end this process with ``code`` should it return.

    Under hydra MPICH's MPI_Abort returns once its request is on the way to mpirun,
    whose proxies then kill the job. Where that kill cannot come (the link to mpirun's
    host is down), a process that went on would reach MPI_Finalize and wait in its
    barrier for mpirun for ever, still holding its place in the job."""
    comm.Abort(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
