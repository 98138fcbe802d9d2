"""Training curves: loss and accuracy per epoch from a run's metrics.

    python -m mpnn.train --metrics m.jsonl --plot curves.png     # at the end of a run
    python -m mpnn.plot m.jsonl curves.png                       # from a metrics file

Two panels: train and test loss (left), test accuracy (right), against the
epoch. Drawn with matplotlib's Agg backend (no display needed) and written
atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys


def read_metrics(path):
    """The JSON records of a ``--metrics`` file, one per line (blank lines skipped)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: not a JSON record ({e})") from None
    if not records:
        raise ValueError(f"{path}: no metrics records (one JSON object per epoch expected)")
    for n, r in enumerate(records, 1):
        missing = [k for k in ("epoch", "train_loss", "test_loss", "test_accuracy") if k not in r]
        if missing:
            raise ValueError(f"{path}: record {n} lacks {', '.join(missing)}")
    return records


def image_format(path, option=None):
    """The image format matplotlib will write for ``path`` (its extension; png
    without one). Raises ValueError, naming ``option`` and the formats, when it
    has none such."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        where = f"{option} {path}" if option else path
        raise ValueError(f"{where}: matplotlib cannot write .{fmt} images; use one of "
                         f"{', '.join('.' + k for k in sorted(known))}")
    return fmt


def plot_metrics(records, path, title=None):
    """Draw ``records`` (dicts with epoch, train_loss, test_loss, test_accuracy) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runtime.files import atomic_write

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in records], "s-", label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["test_accuracy"] for r in records], "s-", color="#2ca02c")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    best = max(records, key=lambda r: r["test_accuracy"])
    ax_acc.set_title(f"test accuracy (best {best['test_accuracy']:.4f}, epoch {best['epoch']})")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=image_format(path), dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


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
