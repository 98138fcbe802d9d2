"""``--trace FILE.json``: what every rank was doing, as a Chrome trace-event file.

Open the file in https://ui.perfetto.dev or chrome://tracing: one process row
per rank (``pid`` = world rank, named ``rank r (dp d, stage s)``), one span per
forward, backward, optimizer step, gradient Allreduce, Send/Recv wait, evaluation
and checkpoint.

Recording is cheap and local: a span appends ``(name, start_ns, stop_ns,
args)`` from ``time.perf_counter_ns`` to a list. Nothing crosses ranks until
``write``, which gathers the lists to rank 0 once, at the end of the run, and
writes the JSON atomically. Every rank's clock is taken relative to the moment
it left a common barrier in ``start``, which lines the rows up across ranks
and nodes (to within the barrier's exit skew, microseconds on one node).

Engines take a tracer and call it on their hot paths; ``NULL_TRACER`` (the
default, and what ``make_tracer(None)`` returns) does nothing::

    with tracer.span("forward", mb=3):
        out = model.forward(x, ctx)
"""

from __future__ import annotations

import json
import time

_now = time.perf_counter_ns


class _Span:
    """Context manager recording one span into a tracer's list (no generator overhead)."""

    __slots__ = ("events", "name", "args", "t0")

    def __init__(self, events, name, args):
        self.events, self.name, self.args = events, name, args

    def __enter__(self):
        self.t0 = _now()
        return self

    def __exit__(self, *exc):
        self.events.append((self.name, self.t0, _now(), self.args))
        return False


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


class NullTracer:
    """A disabled tracer: ``span`` returns one shared no-op context manager."""

    enabled = False

    def span(self, name, **args):
        return _NO_SPAN

    def add(self, name, t0_ns, t1_ns, **args):
        pass

    def start(self, comm):
        pass

    def write(self, path, comm, label=None):
        pass


NULL_TRACER = NullTracer()


class Tracer:
    """Records spans on this rank; ``write`` gathers every rank's to rank 0."""

    enabled = True

    def __init__(self):
        self.events = []  # (name, start_ns, stop_ns, args)
        self.origin = _now()

    def span(self, name, **args):
        """``with tracer.span("backward", mb=k): ...`` records one span."""
        return _Span(self.events, name, args)

    def add(self, name, t0_ns, t1_ns, **args):
        """Record a span measured elsewhere (``perf_counter_ns`` values)."""
        self.events.append((name, t0_ns, t1_ns, args))

    def start(self, comm):
        """Align the ranks' clocks: time 0 is when this rank leaves a barrier."""
        if comm.Get_size() > 1:
            comm.Barrier()
        self.origin = _now()
        self.events.clear()

    def write(self, path, comm, label=None):
        """Collective: gather every rank's spans to rank 0, which writes ``path``.

        label(rank) names a rank's row (default ``rank r``)."""
        rank = comm.Get_rank()
        mine = (rank, self.origin, self.events, label(rank) if label else f"rank {rank}")
        every = comm.gather(mine, root=0) if comm.Get_size() > 1 else [mine]
        if rank != 0:
            return
        from .files import atomic_write

        doc = chrome_trace(every)
        atomic_write(path, lambda f: f.write(json.dumps(doc).encode()))


def chrome_trace(ranks):
    """The trace-event document of ``[(rank, origin_ns, events, row_name), ...]``.

    Complete events (``ph: X``) with ``ts``/``dur`` in microseconds, plus
    ``process_name`` / ``process_sort_index`` metadata per rank."""
    events = []
    for rank, origin, spans, name in sorted(ranks, key=lambda r: r[0]):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": name}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        for span, t0, t1, args in spans:
            event = {"name": span, "cat": _category(span), "ph": "X", "pid": rank, "tid": 0,
                     "ts": (t0 - origin) / 1e3, "dur": (t1 - t0) / 1e3}
            if args:
                event["args"] = args
            events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _category(name):
    if name in ("forward", "backward", "loss"):
        return "compute"
    if name.startswith(("send", "recv", "allreduce", "wait")):
        return "comm"
    return "other"


def make_tracer(path):
    """A recording tracer when ``path`` is set, else ``NULL_TRACER``."""
    return Tracer() if path else NULL_TRACER
