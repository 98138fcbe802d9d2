"""Training curves: loss and accuracy per epoch from a run's metrics.

    python -m mpnn.train --metrics m.jsonl --plot curves.png     # at the end of a run
    python -m mpnn.plot m.jsonl curves.png                       # from a metrics file

Two panels: train and test loss (left), test accuracy (right), against the
epoch (``mpnn.runtime.plots`` draws them).
"""

from __future__ import annotations

import argparse
import sys

from .runtime.plots import plot_metrics, read_metrics


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mpnn.plot",
                                 description="Plot loss and accuracy curves from a --metrics file.")
    ap.add_argument("metrics", help="a --metrics JSON-lines file")
    ap.add_argument("out", help="image to write (.png, .svg, .pdf)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        plot_metrics(read_metrics(args.metrics), args.out, args.title)
    except (OSError, ValueError) as e:
        print(f"mpnn.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
