"""A rank that stops answering ends the job with a diagnosis (``--timeout``), the
flight record, and collective fingerprints (``--check-collectives``).

MPICH ends a job when a rank *dies*, not when it stops answering: a rank
stopped (SIGSTOP), stuck on a dead link or a hung file system leaves the others
spinning in their next collective for ever. So every wait of the training on
MPI runs inside ``watch.op(...)``, which records what is awaited (a short
description, the communicator's world ranks, the peer, the bytes, the
sequence number of the collective on that communicator) and when it began. A
thread (the watchdog) wakes every ``BEAT_S`` seconds and

- sends this rank's state (step, the operation it waits in and for how long,
  or "computing") to every other rank as a UDP datagram, the heartbeat, and
  takes the others'. Not over MPI: a message a thread posts while the main
  thread sits in a collective is delivered only as MPI's progress allows
  (measured: most heartbeats of a busy rank arrived seconds late or not at
  all), and a heartbeat must not depend on what it watches. The addresses
  (this host's name resolved, a port of its own) are exchanged once with an
  ``allgather`` at the start;
- when the operation the main thread waits in has lasted longer than the
  timeout, fires: the lowest-numbered rank among those that still answer
  and wait prints one message (which rank, which operation of which step on
  which ranks, since when; the ranks not heard from for three beats; what
  each live rank was doing), every rank that can writes its flight record,
  and the job ends with ``MPI_Abort`` (status ``EXIT_TIMEOUT``). A rank that
  fired but is not the one to report waits ``GRACE_S`` for that abort and
  ends the job itself if it does not come.

The flight record: each rank's last ``FLIGHT_LEN`` operations (what, the
ranks, the peer, bytes, sequence number, start and end on the rank's clock,
and the wall-clock time of the first), written as JSON to
``flight-rank{R}.json`` in the checkpoint directory (else the working
directory) when the watchdog fires, and beside the trace (``FILE.flight-rank{R}
.json``) when ``--trace`` ends.

The default timeout (``--timeout`` not given) follows the run: before the
first step is timed ``START_S`` (compilation and the first collective wait for
the slowest rank), afterwards ``max(FLOOR_S, STEP_FACTOR x the slowest step
seen)``; a checkpoint's waits add the time to write its bytes at
``WRITE_BYTES_S``. ``--timeout 0`` turns the watchdog off.

``--check-collectives`` (debugging): before each collective every rank of the
communicator exchanges (operation, count, dtype, sequence number, call site)
with an ``allgather`` and a mismatch raises ``CollectiveMismatch`` naming
both ranks' call sites, instead of hanging or corrupting a buffer.

This module imports nothing of mpnn; the engines call ``watch`` (a
``NullWatch`` that does nothing until ``install``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

FLIGHT_LEN = 512
BEAT_S = 0.5  # heartbeat and check interval
SILENT_BEATS = 4  # a rank not heard from for this many beats is "not answering"
GRACE_S = 5.0  # a rank that fired waits this long for the reporter's abort
START_S = 300.0  # default timeout before the first step has been timed
FLOOR_S = 60.0  # default timeout afterwards: at least this ...
STEP_FACTOR = 50  # ... and this many times the slowest step seen
WRITE_BYTES_S = 20e6  # checkpoint waits: + bytes / this
ABORT_WAIT_S = 3  # seconds; then the process ends without MPI_Abort's help
EXIT_TIMEOUT = 124  # the job's exit status when the watchdog ends it (as timeout(1))
DUMP = "__dump__"  # a heartbeat asking every rank for its flight record

_now = time.perf_counter


class CollectiveMismatch(RuntimeError):
    """Ranks of one communicator called different collectives (--check-collectives)."""


class _Op:
    """One communication wait: a context manager recording itself in the flight record.
    Ops nest (an evaluation holds its receives): the innermost is the one reported."""

    __slots__ = ("watch", "what", "detail", "ranks", "peer", "nbytes", "seq", "limit", "step",
                 "t0", "t1", "outer")

    def __init__(self, watch, what, detail, ranks, peer, nbytes, seq, limit):
        self.watch, self.what, self.detail, self.ranks = watch, what, detail, ranks
        self.peer, self.nbytes, self.seq, self.limit = peer, nbytes, seq, limit
        self.step, self.t1 = watch.step, None

    def __enter__(self):
        self.t0 = _now()
        w = self.watch
        self.outer, w.current = w.current, self
        return self

    def __exit__(self, *exc):
        self.t1 = _now()
        w = self.watch
        w.current = self.outer
        self.outer = None
        w.flight[w.n_ops % len(w.flight)] = self
        w.n_ops += 1
        return False

    def text(self):
        """"gradient Allreduce of step 12, bucket 2 of 3" (no ranks)."""
        text = f"{self.what} of step {self.step}" if self.step else self.what
        d = self.detail
        if d is not None:
            text += ", " + (d[0].format(*d[1:]) if isinstance(d, tuple) else d)
        return text

    def describe(self):
        text = self.text()
        if self.peer is not None:
            text += f" {self.peer}"
        if self.ranks is not None:
            text += f" on {self.ranks}"
        return text

    def record(self, t_origin):
        return {"what": self.text(), "ranks": self.ranks, "peer": self.peer,
                "bytes": self.nbytes, "seq": self.seq, "start_s": self.t0 - t_origin,
                "end_s": None if self.t1 is None else self.t1 - t_origin}


class _NoOp:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_OP = _NoOp()


class NullWatch:
    """No watchdog: ``op`` is one shared no-op context manager."""

    enabled = False
    check = False
    step = 0

    def op(self, what, detail=None, comm=None, ranks=None, peer=None, nbytes=0, limit=None,
           check=None):
        return _NO_OP

    def fingerprint(self, comm, what, detail=None, ranks=None, check=None):
        pass

    def step_time(self, seconds):
        pass


def _addresses():
    """This host's IPv4 addresses other than the loopback (every interface that has
    one: Linux's SIOCGIFADDR), then its name resolved; [] when none is found."""
    import fcntl
    import struct

    found = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for name in names:
            try:
                raw = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:  # (no IPv4 address on it)
                continue
            found.append(socket.inet_ntoa(raw[20:24]))
    finally:
        probe.close()
    try:
        found.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return [a for i, a in enumerate(found) if not a.startswith("127.") and a not in found[:i]]


def _routes(mine, everyone):
    """Where to send each rank's heartbeat: the loopback for a rank on this host, else
    its address sharing the longest prefix with one of this host's (same subnet)."""
    host, my_addresses, _ = mine

    def shared_bits(a, b):
        x = int.from_bytes(socket.inet_aton(a), "big") ^ int.from_bytes(socket.inet_aton(b), "big")
        return 32 - x.bit_length()

    routes = []
    for name, addresses, port in everyone:
        if name == host or not addresses:
            routes.append(("127.0.0.1", port))
            continue
        best = max(addresses, key=lambda a: max((shared_bits(a, m) for m in my_addresses),
                                               default=0))
        routes.append((best, port))
    return routes


def _short(path):
    """mpnn/runtime/loop.py for a file of the package, else the path itself."""
    marker = f"{os.sep}mpnn{os.sep}"
    return "mpnn/" + path.rsplit(marker, 1)[1] if marker in path else path


def world_ranks(comm):
    """The world rank of each of ``comm``'s ranks, in its rank order."""
    from mpi4py import MPI

    group, everyone = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    ranks = MPI.Group.Translate_ranks(group, list(range(group.Get_size())), everyone)
    group.Free()
    everyone.Free()
    return ranks


def group_ranks(comm, name):
    """``name`` of world ranks a, b, ... (``comm``'s members), for the messages."""
    ranks = world_ranks(comm)
    return f"{name} of world rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


class Watch:
    """The watchdog of one training run over ``world`` (collective to start and stop)."""

    enabled = True

    def __init__(self, world, timeout=None, check=False, out_dir=None, prog="mpnn.train"):
        self.world, self.index, self.size = world, world.Get_rank(), world.Get_size()
        # messages and files name world ranks (a sweep's group is part of the world)
        self.world_ranks = world_ranks(world)
        self.rank = self.world_ranks[self.index]
        self.fixed = timeout  # None: the default, following the step time
        self.check = check
        self.out_dir = out_dir or "."
        self.prog = prog
        self.flight = [None] * FLIGHT_LEN
        self.n_ops = 0
        self.current = None
        self.step = 0
        self.slowest_step = None
        # (tests only: a lower floor, so that the step-time rule is what keeps runs alive)
        self.floor = float(os.environ.get("MPNN_TEST_WATCHDOG_FLOOR_S", FLOOR_S))
        self.seqs = {}  # id(comm) -> collectives started on it
        self.heard = {}  # rank -> (monotonic time, its last state)
        self.t_origin, self.wall_origin = _now(), time.time()
        self._stop = threading.Event()
        self._thread = None
        self._sock = None
        self._peers = []  # every rank's heartbeat address, (host, port)
        self._sent = [0] * self.size  # heartbeats sent to / received from each rank
        self._received = [0] * self.size
        self._token = None  # this run's, in every datagram (others' are ignored)
        self._dumped, self._flight_path = False, None

    # ------------------------------------------------------------ main thread

    def op(self, what, detail=None, comm=None, ranks=None, peer=None, nbytes=0, limit=None,
           check=None):
        """A context manager around one wait on MPI. ``what`` names it ("gradient
        Allreduce": the message adds "of step N"), ``detail`` a string or a
        (format, args...) tuple formatted only when shown ("bucket {} of {}", 2, 3);
        ``peer`` ("from world rank 1"); ``ranks`` the group (``group_ranks``);
        ``comm`` numbers the collectives on it; ``limit`` replaces the timeout for
        this wait; ``check`` = (operation, count, dtype) fingerprints the collective
        first under --check-collectives (collective over ``comm``)."""
        seq = None
        if comm is not None:
            seq = self.seqs.get(id(comm), 0)
            self.seqs[id(comm)] = seq + 1
            if self.check and check is not None:  # (itself a watched wait)
                with _Op(self, f"--check-collectives exchange before the {what}", detail,
                         ranks, None, 0, seq, limit):
                    self._fingerprint(comm, what, seq, check)
        return _Op(self, what, detail, ranks, peer, nbytes, seq, limit)

    def fingerprint(self, comm, what, detail=None, ranks=None, check=None):
        """Number a collective whose wait is watched later (a nonblocking one, as it
        starts) and, under --check-collectives, check it as ``op(check=...)`` does."""
        self.op(what, detail, comm, ranks, check=check)  # (no wait of its own to record)

    def step_time(self, seconds):
        """A training step took ``seconds``: the default timeout follows the slowest."""
        if self.slowest_step is None or seconds > self.slowest_step:
            self.slowest_step = seconds

    def timeout(self):
        if self.fixed is not None:
            return self.fixed
        if self.slowest_step is None:
            return START_S
        return max(self.floor, STEP_FACTOR * self.slowest_step)

    def _fingerprint(self, comm, what, seq, check):
        caller = sys._getframe(1)
        while caller.f_code.co_filename == __file__:  # past op() and fingerprint()
            caller = caller.f_back
        frames = [caller, caller.f_back]  # the caller, and its caller
        site = ", called from ".join(
            f"{_short(f.f_code.co_filename)}:{f.f_lineno} ({f.f_code.co_name})"
            for f in frames)
        mine = (str(check[0]), int(check[1]), str(check[2]), seq)
        label = f"{what} of step {self.step}" if self.step else what
        everyone = comm.allgather((mine, site, label, self.rank))
        first = everyone[0]
        for other in everyone[1:]:
            if other[0] != first[0]:
                (a, a_site, a_what, a_rank), (b, b_site, b_what, b_rank) = first, other
                raise CollectiveMismatch(
                    f"--check-collectives: world rank {a_rank} calls {a[0]} of {a[1]} {a[2]} "
                    f"(watched collective #{a[3]} on this communicator: the {a_what}) at "
                    f"{a_site}; but world rank {b_rank} calls {b[0]} of {b[1]} {b[2]} "
                    f"(watched collective #{b[3]}: the {b_what}) at {b_site}")

    # ----------------------------------------------------------- start, stop

    def start(self):
        """Collective over the world: the heartbeat addresses, then the thread."""
        if self.size > 1:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind(("0.0.0.0", 0))
            self._sock.setblocking(False)
            self._token = self.world.bcast(os.urandom(8).hex() if self.index == 0 else None)
            mine = (socket.gethostname(), _addresses(), self._sock.getsockname()[1])
            self._peers = _routes(mine, self.world.allgather(mine))
        self._thread = threading.Thread(target=self._run, name="mpnn-watchdog", daemon=True)
        self._thread.start()

    def stop(self):
        """The thread ends and the socket closes (local: no rank waits for another)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def halt(self):
        """Stop the thread and close the socket (a failure is ending the run)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * BEAT_S)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def write_flight(self, path):
        """This rank's flight record as JSON (an atomic rename)."""
        n = min(self.n_ops, FLIGHT_LEN)
        ops = [self.flight[(self.n_ops - n + k) % FLIGHT_LEN] for k in range(n)]
        cur = self.current
        record = {"rank": self.rank, "clock_origin_unix_s": self.wall_origin,
                  "step": self.step, "ops_total": self.n_ops,
                  "waiting": None if cur is None else cur.record(self.t_origin),
                  "ops": [o.record(self.t_origin) for o in ops]}
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------ the thread

    def _state(self):
        cur = self.current
        if cur is None:
            return (self.step, None, 0.0)
        return (self.step, cur.describe(), _now() - cur.t0)

    def _run(self):
        first = True
        while first or not self._stop.wait(BEAT_S):  # the first beat at once
            first = False
            try:
                self._beat()
                cur = self.current
                if cur is not None:
                    limit = cur.limit if cur.limit is not None else self.timeout()
                    waited = _now() - cur.t0
                    if limit > 0 and waited > limit and self.current is cur:
                        if self._fire(cur, waited, limit):
                            return
                        continue  # the wait ended during the grace: a slow rank, not a dead one
            except Exception as e:  # noqa: BLE001 - a broken watchdog must not end training
                print(f"{self.prog}: watchdog on rank {self.rank} stopped: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return

    def _beat(self):
        sock = self._sock
        if sock is None:
            return
        message = json.dumps([self._token, self.index, *self._state()]).encode()
        for dest, address in enumerate(self._peers):
            if dest != self.index:
                try:
                    sock.sendto(message, address)
                    self._sent[dest] += 1
                except OSError:  # (a full buffer, an unreachable host: the next beat retries)
                    pass
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                token, src, step, what, waited = json.loads(data)
                if token != self._token or not 0 <= src < self.size:
                    continue  # not a heartbeat of this run
                if what == DUMP:  # another rank fired: this one's record too
                    self._dump()
                    continue
                self.heard[src] = (_now(), (int(step), what, float(waited)))
                self._received[src] += 1
            except (ValueError, TypeError):
                continue

    def _dump(self):
        """Write this rank's flight record (once); its path, or None if it could not be."""
        if not self._dumped:
            self._dumped = True
            try:
                self._flight_path = self.write_flight(
                    os.path.join(self.out_dir, f"flight-rank{self.rank}.json"))
            except OSError:
                self._flight_path = None
        return self._flight_path

    def _ask_for_dumps(self):
        message = json.dumps([self._token, self.index, self.step, DUMP, 0.0]).encode()
        for dest, address in enumerate(self._peers):
            if dest != self.index:
                try:
                    self._sock.sendto(message, address)
                except OSError:
                    pass

    def _fire(self, cur, waited, limit):
        """Report and end the job; False when this rank was to wait for another's report
        and its own wait ended meanwhile (a slow rank: the watch goes on)."""
        try:
            return self._report(cur, waited, limit)
        except Exception as e:  # noqa: BLE001 - whatever failed, the job must not hang
            print(f"{self.prog}: watchdog on world rank {self.rank}: the {cur.describe()} has "
                  f"waited {waited:.1f} s (timeout {limit:.0f} s); the report failed "
                  f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            self._end()
            return True

    def _report(self, cur, waited, limit):
        now = _now()
        live = {r: s for r, (t, s) in self.heard.items() if now - t < SILENT_BEATS * BEAT_S}
        silent = [r for r in range(self.size) if r != self.index and r not in live]
        # the reporter: the lowest rank past (about) the timeout among those that answer
        waiting = [r for r, s in live.items() if s[1] is not None and s[2] >= limit / 2]
        reporter = min([self.index, *waiting])
        if self._sock is not None:
            self._ask_for_dumps()
        path = self._dump()
        if self.index != reporter:  # the reporter's abort ends this rank too
            time.sleep(GRACE_S)
            if self.current is not cur:
                self._dumped = False
                return False
        elif self._sock is not None:
            time.sleep(0.5)  # the others write their flight records
        since = time.strftime("%H:%M:%S", time.localtime(self.wall_origin + cur.t0
                                                         - self.t_origin))
        lines = [f"{self.prog}: watchdog: world rank {self.rank} has waited {waited:.1f} s "
                 f"(timeout {limit:.0f} s) in the {cur.describe()}, since {since}"]
        for r in silent:
            t_s, name = self.heard.get(r), self.world_ranks[r]
            if t_s is None:
                lines.append(f"  world rank {name}: not answering (no heartbeat since the start, "
                             f"{now - self.t_origin:.1f} s ago)")
            else:
                t, (step, what, w) = t_s
                doing = f"waiting {w:.1f} s in the {what}" if what else "computing"
                lines.append(f"  world rank {name}: not answering for {now - t:.1f} s (last "
                             f"heard at step {step}, {doing})")
        for r in sorted(live):
            step, what, w = live[r]
            doing = f"waiting {w:.1f} s in the {what}" if what else "computing (not in MPI)"
            lines.append(f"  world rank {self.world_ranks[r]}: answering, step {step}, {doing}")
        if path:
            lines.append(f"  flight records: {os.path.join(self.out_dir, 'flight-rank*.json')} "
                         f"(each rank's last {FLIGHT_LEN} communication events)")
        lines.append("  checkpoints already written stay; resume with --resume")
        text = "\n".join(lines) + "\n"
        try:
            os.write(2, text.encode(errors="backslashreplace"))
        except OSError:
            pass
        time.sleep(0.2)  # let mpirun's proxy forward the lines before the kill
        self._end()
        return True

    def _end(self):
        """MPI_Abort, and if that has not ended this process within ABORT_WAIT_S,
        the kernel does: MPI_Abort does not return when the network to the other
        ranks is gone, and it holds Python's GIL meanwhile, so no Python timer
        could run; SIGALRM's default action ends the process instead, and the
        launcher then ends the job as for a rank that died. Where it returns (it may,
        ``agree.abort``), the process ends at once."""
        import signal

        from .agree import abort

        for release in list(_AT_ABORT):  # what MPI_Abort would skip (the directory's lock)
            try:
                release()
            except Exception:  # noqa: BLE001, S110 - ending the job matters more
                pass
        if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):
            signal.alarm(int(ABORT_WAIT_S))
        abort(self.world, EXIT_TIMEOUT)  # and where MPI_Abort returns, the process ends


_AT_ABORT = []  # callables run before the watchdog's MPI_Abort (``at_abort``)


def at_abort(release):
    """Run ``release()`` before the watchdog ends the job (MPI_Abort skips every finally)."""
    _AT_ABORT.append(release)


watch = NullWatch()  # what the engines call; ``install`` replaces it for a run


def install(w):
    """Make ``w`` the watch the engines report to (returns the previous one)."""
    global watch
    previous, watch = watch, w
    return previous


def current():
    return watch
