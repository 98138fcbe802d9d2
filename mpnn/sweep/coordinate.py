"""Handing out trials: world rank 0 coordinates from a thread, beside its own training.

    Coordinator   world rank 0: answers each group leader's request with the next
                  trial of the ``Plan`` (or "stop"), records the results it carries
    ask           a group leader (not world rank 0): send the last result, wait for
                  the next trial's index
    share         a group's rank 0 hands the index to every rank of its group

No rank is given to coordinating. World rank 0 also leads group 0 and trains;
its coordinator thread (``Coordinator.start``) polls the control
communicator with one ``Iprobe`` every ``POLL_S`` seconds and answers at once,
whatever the main thread is doing (a step, the set-up of its next trial with
its data loading, an evaluation): answering only between steps would keep a
group waiting through all of those. That needs ``MPI_THREAD_MULTIPLE``,
which mpi4py asks for and the PyPI MPICH gives; the plan is shared with the
main thread's ``own_next`` under a lock. Control messages are small Python
objects on a communicator of their own (lowercase mpi4py calls, pickled: a
few per trial, off the training path).

Every wait here polls its request and sleeps ``POLL_S`` between tests: a
blocking MPI wait spins its core at 100% (MPICH busy-polls), and an idle
group's spinning ranks would slow down the groups that train on the same
cores.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from mpi4py import MPI

REQUEST, ASSIGN = 1, 2  # tags on the control communicator
STOP = -1
POLL_S = 0.002


def wait(req):
    """The value of a lowercase request, polling it without spinning a core."""
    while True:
        done, value = req.test()
        if done:
            return value
        time.sleep(POLL_S)


def wait_buffer(req):
    """Complete a buffer (uppercase) request, polling it without spinning a core."""
    while not req.Test():
        time.sleep(POLL_S)


def ask(ctl, group, result):
    """A group leader: hand ``result`` (of the trial just run, or None) to world rank
    0 and return the index of the group's next trial (None: the sweep is done)."""
    wait(ctl.isend((group, result), dest=0, tag=REQUEST))
    k = wait(ctl.irecv(source=0, tag=ASSIGN))
    return None if k == STOP else k


def share(comm, k):
    """The index ``k`` of comm's rank 0 (None: stop) on every rank of ``comm``."""
    buf = np.array([STOP if k is None else k], dtype=np.int64)
    if comm.Get_size() > 1:
        wait_buffer(comm.Ibcast(buf, root=0))
    return None if buf[0] == STOP else int(buf[0])


class Coordinator:
    """World rank 0's side: the plan, the stopped groups, what to do with a result
    (``on_result(record)``, called under the lock from either thread)."""

    def __init__(self, ctl, plan, n_groups, on_result):
        from mpi4py import MPI

        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError("mpnn.sweep's coordinator thread needs MPI_THREAD_MULTIPLE, and "
                               "this MPI gives less (mpi4py.rc.thread_level, or the MPI build)")
        self.ctl, self.plan, self.n_groups, self.on_result = ctl, plan, n_groups, on_result
        self.stopped = set()
        self._sends = []  # isend requests, kept until complete
        self._status = MPI.Status()
        self._lock = threading.Lock()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mpnn.sweep coordinator",
                                        daemon=True)

    def start(self):
        self._thread.start()

    def own_next(self, result):
        """Group 0 (world rank 0's own): record ``result``, take the next trial."""
        with self._lock:
            if result is not None:
                self._record(result)
            return self._assign(0)

    def finish(self):
        """After group 0 is done: wait until every group has been told to stop."""
        while True:
            with self._lock:
                if len(self.stopped) == self.n_groups and not self._sends:
                    break
            time.sleep(POLL_S)
        self._quit.set()
        self._thread.join()

    def _loop(self):
        while not self._quit.is_set():
            with self._lock:
                self._serve()
            time.sleep(POLL_S)

    def _serve(self):
        """Answer every request waiting now (non-blocking)."""
        while self.ctl.Iprobe(source=MPI.ANY_SOURCE, tag=REQUEST, status=self._status):
            source = self._status.Get_source()
            group, result = self.ctl.recv(source=source, tag=REQUEST)
            if result is not None:
                self._record(result)
            k = self._assign(group)
            self._sends.append(self.ctl.isend(STOP if k is None else k, dest=source,
                                              tag=ASSIGN))
        self._sends = [r for r in self._sends if not r.Test()]

    def _record(self, result):
        """``on_result``; if it fails (results.jsonl unwritable, the disk full), the
        sweep cannot keep its promise to record every trial: end the whole job, as
        the groups waiting for an answer would otherwise wait for ever."""
        try:
            self.on_result(result)
        except Exception as e:  # noqa: BLE001 - reported, then the job ends
            from ..runtime.agree import abort, say

            say(f"mpnn.sweep: error: cannot record the result of trial {result['id']}: "
                f"{type(e).__name__}: {e}; the trials recorded so far are in results.jsonl "
                f"(continue with --resume)")
            time.sleep(0.2)
            abort(MPI.COMM_WORLD, 1)

    def _assign(self, group):
        k = self.plan.next(group)
        if k is None:
            self.stopped.add(group)
        return k
