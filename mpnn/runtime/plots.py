"""Training curves: loss and accuracy per epoch from a run's metrics.

    read_metrics(path)          the records of a --metrics file
    image_format(path)          the format matplotlib writes for a file name (checked up front)
    plot_metrics(records, path) two panels, train/test loss and test accuracy per epoch

Drawn with matplotlib's Agg backend (no display needed) and written
atomically. ``python -m mpnn.plot`` is the command-line tool over these.
"""

from __future__ import annotations

import io
import json
import os


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

    from .files import atomic_write

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
