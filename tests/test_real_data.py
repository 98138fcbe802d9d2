"""Real data, default settings: the accuracy the README and the issue promise.

Uses MNIST from $MPNN_DATA and Fashion-MNIST from the usual places
(/usr/share/datasets from Debian's dataset-fashion-mnist). When the files are
absent the tests skip saying so, unless MPNN_REQUIRE_DATA=1 (CI), where
absence is a failure.
"""

import pytest

from mpnn.data import DataError
from mpnn.runtime.loop import train

from conftest import build_run


def trained_accuracy(dataset, require_data):
    try:
        run = build_run(["--dataset", dataset, "--quiet"])  # default settings
    except DataError as e:
        if require_data:
            raise
        pytest.skip(f"{dataset} IDX files not present here ({str(e).splitlines()[0]})")
    assert run.model.sizes == [784, 256, 128, 64, 10]
    history = train(run)
    assert len(history) == 10
    return max(r["test_accuracy"] for r in history), history[-1]["test_accuracy"]


def test_fashion_mnist_defaults_reach_089(require_data, monkeypatch):
    monkeypatch.setenv("MPNN_MIRROR", "http://127.0.0.1:9/")  # never download in tests
    best, last = trained_accuracy("fashion-mnist", require_data)
    assert last >= 0.89, f"final test accuracy {last:.4f} (best {best:.4f})"


def test_mnist_defaults_reach_098(require_data, monkeypatch):
    monkeypatch.setenv("MPNN_MIRROR", "http://127.0.0.1:9/")
    best, last = trained_accuracy("mnist", require_data)
    assert last >= 0.98, f"final test accuracy {last:.4f} (best {best:.4f})"
