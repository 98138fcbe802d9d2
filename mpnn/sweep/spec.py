"""A sweep's spec: TOML with shared options, a grid of values, and hand-written trials.

    [base]                      # options every trial shares
    dataset = "digits"
    epochs = 5
    [grid]                      # lists: their cartesian product gives the trials
    lr = [0.001, 0.003]
    hidden = ["256,128", "512"]
    seed = [0, 1]
    [[trial]]                   # more trials, each over [base]
    optimizer = "sgd"
    lr = 0.05

Keys are ``python -m mpnn.train`` option names with ``_`` for ``-``
(``batch_size``, ``micro_batches``, ``pp``...); a flag (``nesterov``) takes
true or false; ``hidden`` takes "256,128" or [256, 128]. The grid's first
key varies slowest. The sweep sets each trial's outputs itself (weights,
metrics, its log), so the output and checkpoint options are refused here.

``load_spec`` returns the trials in order, each with its options and the
``mpnn.train`` command line they make, after checking every trial's options
the way ``mpnn.train`` parses them (an unknown option or a bad value is a
SpecError naming the trial and the key, before any trial starts).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import itertools
import json
import tomllib
from dataclasses import dataclass

from ..train import build_parser, parse_config

# options the sweep sets for every trial, or that make no sense inside one
RESERVED = ("save", "metrics", "plot", "trace", "quiet", "checkpoint_dir", "checkpoint_every",
            "checkpoint_keep", "resume", "help")
TABLES = ("base", "grid", "trial")


class SpecError(ValueError):
    """A spec that cannot give trials; the message says where and how to fix it."""


@dataclass(frozen=True)
class Trial:
    """One training of the sweep: its place, its options, their command line."""

    index: int
    options: dict  # key -> value, [base] merged with the grid point or [[trial]]
    argv: tuple  # the mpnn.train options they make (outputs not included)
    config: object  # the RunConfig they parse to

    @property
    def id(self):
        return f"{self.index:03d}"

    def key(self):
        """The options as one canonical string (a resumed sweep matches trials by it)."""
        return json.dumps(self.options, sort_keys=True)


def _options():
    """mpnn.train's options: key -> (flag, takes a value)."""
    out = {}
    for action in build_parser()._actions:  # noqa: SLF001 - the parser's own option table
        flags = [f for f in action.option_strings if f.startswith("--")]
        if flags:
            out[action.dest] = (flags[0], action.nargs != 0)
    return out


def _value_text(key, value, where):
    """The command-line text of one spec value."""
    if key == "hidden" and isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise SpecError(f"{where}: hidden = {value!r}: give widths as \"256,128\" or "
                            f"[256, 128]")
        return ",".join(map(str, value))
    if isinstance(value, bool | list | dict):
        raise SpecError(f"{where}: {key} = {value!r}: expected a number or a string")
    return repr(value) if isinstance(value, float) else str(value)


def trial_argv(options, where, known=None):
    """The mpnn.train command line of one trial's options (SpecError on a bad key)."""
    known = known or _options()
    argv = []
    for key, value in options.items():
        if key in RESERVED:
            raise SpecError(f"{where}: {key} is set by the sweep (each trial writes its own "
                            f"weights, metrics and log under --out); remove it")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise SpecError(f"{where}: unknown option {key!r}{hint}; keys are mpnn.train's "
                            f"options with _ for - (python -m mpnn.train --help)")
        flag, takes_value = known[key]
        if not takes_value:
            if not isinstance(value, bool):
                raise SpecError(f"{where}: {key} is a flag: give true or false, not {value!r}")
            argv += [flag] if value else []
            continue
        argv += [flag, _value_text(key, value, where)]
    return argv


def parse_trial(argv, where):
    """The RunConfig of a trial's command line, or SpecError with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse_config(list(argv))
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else "invalid options"
        raise SpecError(f"{where}: {message}") from None


def load_spec(path):
    """The trials of the spec at ``path``, in order (SpecError if there is none or any
    is invalid)."""
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    unknown = [t for t in spec if t not in TABLES]
    if unknown:
        raise SpecError(f"{path}: unknown table(s) {', '.join(unknown)}; a spec has [base], "
                        f"[grid] and [[trial]]")
    base, grid, extra = spec.get("base", {}), spec.get("grid", {}), spec.get("trial", [])
    if not isinstance(base, dict) or not isinstance(grid, dict) or not isinstance(extra, list):
        raise SpecError(f"{path}: [base] and [grid] are tables, [[trial]] an array of tables")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise SpecError(f"{path}: [grid] {key} = {values!r}: give a list of values")
        if not values:
            raise SpecError(f"{path}: [grid] {key} = []: an empty list gives no trials")
    points = [dict(zip(grid, combo, strict=True)) for combo in
              itertools.product(*grid.values())] if grid else []
    merged = [{**base, **p} for p in points] + [{**base, **t} for t in extra]
    if not merged:
        raise SpecError(f"{path}: the spec gives no trials: add lists under [grid] or "
                        f"[[trial]] tables")
    known = _options()
    trials = []
    for k, options in enumerate(merged):
        where = f"{path}: trial {k:03d} ({_short(options, grid)})"
        argv = tuple(trial_argv(options, where, known))
        trials.append(Trial(k, options, argv, parse_trial(argv, where)))
    return trials


def _short(options, grid):
    """The options that tell a trial apart (the grid's keys), for messages and tables."""
    shown = {k: v for k, v in options.items() if k in grid} or options
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def varying(trials):
    """The option keys whose values differ between trials (for the report)."""
    keys = []
    for t in trials:
        keys += [k for k in t.options if k not in keys]
    return [k for k in keys if len({json.dumps(t.options.get(k)) for t in trials}) > 1]
