"""Datasets: lookup order, download path, offline errors, digits, synthetic, real data.

The real-data tests use MNIST and Fashion-MNIST where the normal lookup finds
them (``$MPNN_DATA``, ``~/.cache/mpnn``, ``/usr/share/datasets``) and skip
otherwise, unless ``MPNN_REQUIRE_DATA=1`` (CI; the ``require_data`` fixture), where
absence is a failure.
"""

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from mpnn.data import DATASETS, DataError, Dataset, load_dataset, write_idx
from mpnn.data import datasets as ds_mod
from mpnn.data import download as dl

STEMS = ds_mod.IDX_FILES


def _write_idx_dir(directory, marker, n_train=6, n_test=4, gz=False, side=28):
    """Four IDX files whose pixels all equal ``marker``, so a test can tell dirs apart."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}",
                  np.full((n, side, side), marker, dtype=np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}",
                  (np.arange(n) % 10).astype(np.uint8))
    return directory


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """An isolated world: HOME, MPNN_DATA and the system root all under tmp_path."""
    home, system = tmp_path / "home", tmp_path / "system"
    home.mkdir()
    system.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MPNN_DATA", raising=False)
    monkeypatch.delenv("MPNN_MIRROR", raising=False)
    monkeypatch.setattr(ds_mod, "SYSTEM_ROOT", system)
    return {"tmp": tmp_path, "cache": home / ".cache" / "mpnn", "system": system}


def _marker(ds):
    return round(float(ds.x_train[0, 0]) * 255)


# ------------------------------------------------------------------------ lookup


def test_lookup_order(roots, monkeypatch):
    data_dir, env = roots["tmp"] / "arg", roots["tmp"] / "env"
    _write_idx_dir(data_dir / "mnist", 1)
    _write_idx_dir(env / "mnist", 2, gz=True)
    _write_idx_dir(roots["cache"] / "mnist", 3)
    _write_idx_dir(roots["system"] / "mnist", 4, gz=True)
    monkeypatch.setenv("MPNN_DATA", str(env))
    assert _marker(load_dataset("mnist", data_dir=data_dir, download=False)) == 1
    assert _marker(load_dataset("mnist", download=False)) == 2
    monkeypatch.delenv("MPNN_DATA")
    assert _marker(load_dataset("mnist", download=False)) == 3
    assert _marker(load_dataset("mnist", data_dir=roots["tmp"] / "nowhere", download=False)) == 3
    for f in (roots["cache"] / "mnist").iterdir():
        f.unlink()
    assert _marker(load_dataset("mnist", download=False)) == 4


def test_name_subdir_before_root_and_root_itself(roots):
    root = roots["tmp"] / "data"
    _write_idx_dir(root, 7)
    assert _marker(load_dataset("fashion-mnist", data_dir=root, download=False)) == 7
    _write_idx_dir(root / "fashion-mnist", 8)
    assert _marker(load_dataset("fashion-mnist", data_dir=root, download=False)) == 8


def test_incomplete_cache_or_system_dir_is_skipped_and_reported(roots):
    _write_idx_dir(roots["system"] / "mnist", 4)
    cache = _write_idx_dir(roots["cache"] / "mnist", 3)
    (cache / "t10k-labels-idx1-ubyte").unlink()
    assert _marker(load_dataset("mnist", download=False)) == 4  # not named by the user
    (roots["system"] / "mnist" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=roots["tmp"], download=False)  # holds no IDX files
    message = str(info.value)
    assert f"{cache} (incomplete: missing t10k-labels-idx1-ubyte)" in message
    assert f"{roots['system'] / 'mnist'} (incomplete: missing t10k-images-idx3-ubyte)" in message


def _named_partial(roots, where):
    """A complete copy in the system root, and ``where`` holding three of the four files."""
    _write_idx_dir(roots["system"] / "fashion-mnist", 4)
    return _write_idx_dir(where, 5)


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_incomplete_data_dir_is_an_error_not_a_fallback(roots, sub):
    # one file misnamed: before, the system root's copy was trained on without a word
    data_dir = roots["tmp"] / "data"
    d = _named_partial(roots, data_dir / sub)
    (d / "t10k-labels-idx1-ubyte").rename(d / "t10k-labels.gz")
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=data_dir, download=True)
    message = str(info.value)
    assert f"{d} (named by --data-dir" in message, message
    assert "holds only part of the dataset: missing t10k-labels-idx1-ubyte" in message
    assert "it also holds t10k-labels.gz" in message
    assert "under exactly these names" in message


def test_dangling_symlink_in_data_dir_is_named(roots):
    d = _named_partial(roots, roots["tmp"] / "data")
    target = roots["tmp"] / "elsewhere" / "train-images-idx3-ubyte"
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte").symlink_to(target)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=d, download=False)
    message = str(info.value)
    assert f"train-images-idx3-ubyte is a dangling symlink (to {target}, which does not " \
           f"exist)" in message, message
    assert "missing" not in message  # the other three are there
    (d / "train-images-idx3-ubyte.gz").symlink_to(target)  # still nothing readable
    with pytest.raises(DataError, match="dangling symlink"):
        load_dataset("fashion-mnist", data_dir=d, download=False)
    write_idx(d / "train-images-idx3-ubyte.gz", np.full((6, 28, 28), 6, dtype=np.uint8))
    assert _marker(load_dataset("fashion-mnist", data_dir=d, download=False)) == 6


def test_incomplete_mpnn_data_is_an_error_not_a_fallback(roots, monkeypatch):
    env = roots["tmp"] / "env"
    d = _named_partial(roots, env / "fashion-mnist")
    (d / "train-labels-idx1-ubyte").unlink()
    monkeypatch.setenv("MPNN_DATA", str(env))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", download=False)
    message = str(info.value)
    assert f"{d} (named by MPNN_DATA) holds only part of the dataset: missing " \
           f"train-labels-idx1-ubyte" in message, message
    empty = roots["tmp"] / "empty"  # a named directory holding none of the files is passed
    empty.mkdir()                   # over: one root can hold several datasets
    monkeypatch.setenv("MPNN_DATA", str(empty))
    assert _marker(load_dataset("fashion-mnist", data_dir=empty, download=False)) == 4


def test_incomplete_data_dir_ends_the_cli_with_the_message(roots, capsys):
    from mpnn.train import main

    d = _named_partial(roots, roots["tmp"] / "data")
    (d / "t10k-images-idx3-ubyte").unlink()
    assert main(["--dataset", "fashion-mnist", "--data-dir", str(d), "--epochs", "1",
                 "--quiet"]) == 2
    assert f"{d} (named by --data-dir" in capsys.readouterr().err


def test_plain_and_gz_mixed(roots):
    root = _write_idx_dir(roots["tmp"] / "data", 9, gz=True)
    write_idx(root / "train-images-idx3-ubyte", np.full((6, 28, 28), 9, dtype=np.uint8))
    (root / "train-images-idx3-ubyte.gz").unlink()
    assert _marker(load_dataset("mnist", data_dir=root, download=False)) == 9


def test_scaling_shapes_and_dtypes(roots):
    root = roots["tmp"] / "data"
    _write_idx_dir(root, 255, n_train=6, n_test=4)
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8))
    ds = load_dataset("mnist", data_dir=root, download=False)
    assert isinstance(ds, Dataset) and ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784) and ds.n_features == 784
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert np.all(ds.x_train == 1.0) and np.all(ds.x_test == 0.0)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5]
    ds64 = load_dataset("mnist", data_dir=root, download=False, dtype=np.float64)
    assert ds64.x_train.dtype == np.float64


def test_malformed_file_is_named(roots):
    root = _write_idx_dir(roots["tmp"] / "data", 1)
    bad = root / "train-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", data_dir=root, download=False)
    assert str(bad) in str(info.value)


def test_label_count_mismatch_is_named(roots):
    root = _write_idx_dir(roots["tmp"] / "data", 1)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        load_dataset("mnist", data_dir=root, download=False)


def test_not_found_without_download_lists_places(roots, monkeypatch):
    env = roots["tmp"] / "env"
    monkeypatch.setenv("MPNN_DATA", str(env))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=roots["tmp"] / "arg", download=False)
    message = str(info.value)
    for place in (roots["tmp"] / "arg" / "fashion-mnist", roots["tmp"] / "arg",
                  env / "fashion-mnist", env, roots["cache"] / "fashion-mnist", roots["cache"],
                  roots["system"] / "fashion-mnist", roots["system"]):
        assert f"\n  {place}\n" in message + "\n", place
    assert "Downloading is disabled" in message and "--data-dir" in message
    assert "MPNN_DATA" in message


def test_offline_error_lists_places_and_urls(roots, monkeypatch):
    # port 9 on localhost refuses connections: a deterministic stand-in for "offline"
    monkeypatch.setenv("MPNN_MIRROR", "http://127.0.0.1:9/a,http://127.0.0.1:9/b")
    with pytest.raises(DataError) as info:
        load_dataset("mnist", progress=False)
    message = str(info.value)
    assert str(roots["cache"] / "mnist") in message and str(roots["system"]) in message
    assert "http://127.0.0.1:9/a/train-images-idx3-ubyte.gz" in message
    assert "http://127.0.0.1:9/b/train-images-idx3-ubyte.gz" in message
    assert "--data-dir" in message
    assert not (roots["cache"] / "mnist").exists()  # not even the empty directory


# ---------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server over tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_then_load_from_cache(roots, mirror, monkeypatch):
    served, url = mirror
    _write_idx_dir(served, 42, gz=True)
    sums = {f"{s}.gz": hashlib.sha256((served / f"{s}.gz").read_bytes()).hexdigest()
            for s in STEMS}
    monkeypatch.setitem(dl.FILES, "fashion-mnist", sums)
    monkeypatch.setenv("MPNN_MIRROR", url)
    ds = load_dataset("fashion-mnist", progress=False)
    assert _marker(ds) == 42 and ds.x_train.shape == (6, 784)
    cached = roots["cache"] / "fashion-mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(sums)
    monkeypatch.setenv("MPNN_MIRROR", "http://127.0.0.1:9/")  # now found without network
    assert _marker(load_dataset("fashion-mnist", download=False)) == 42


def test_download_checksum_mismatch_leaves_cache_empty(roots, mirror, monkeypatch):
    served, url = mirror
    _write_idx_dir(served, 42, gz=True)
    monkeypatch.setitem(dl.FILES, "mnist", {f"{s}.gz": "0" * 64 for s in STEMS})
    monkeypatch.setenv("MPNN_MIRROR", url)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", progress=False)
    assert not (roots["cache"] / "mnist").exists()


PER_NODE_CACHE_RUN = """
import json, sys
from mpnn.data import datasets, download
download.FILES["mnist"] = json.loads(sys.argv[1])
datasets.search_dirs = lambda name, data_dir=None: []  # only this rank's download cache
from mpnn.train import main
sys.exit(main(["--dataset", "mnist", "--quiet", "--epochs", "1", "--hidden", "8",
               "--batch-size", "2", *sys.argv[2:]]))
"""


def test_ranks_with_their_own_cache_download_for_themselves(mirror, tmp_path):
    # nodes with separate home directories: rank 1 does not see what rank 0
    # fetched, and must fetch it too (not fail with "downloading is disabled").
    # Both ranks are on this machine, one node, so --no-shared-data makes each
    # load for itself as the first rank of a node does (test_multihost has real nodes).
    served, url = mirror
    _write_idx_dir(served, 42, gz=True)
    sums = {f"{s}.gz": hashlib.sha256((served / f"{s}.gz").read_bytes()).hexdigest()
            for s in STEMS}
    homes = [tmp_path / "node0", tmp_path / "node1"]
    env = {k: v for k, v in os.environ.items() if k != "MPNN_DATA"}
    env.update(MPNN_MIRROR=url, OMP_NUM_THREADS="1")
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    cmd = [mpirun]
    for i, home in enumerate(homes):  # MPMD: one rank per "node", each with its HOME
        home.mkdir()
        cmd += ([":"] if i else []) + ["-n", "1", "-env", "HOME", str(home), sys.executable,
                                       "-c", PER_NODE_CACHE_RUN, json.dumps(sums),
                                       "--no-shared-data"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    for home in homes:
        cache = home / ".cache" / "mpnn" / "mnist"
        assert sorted(x.name for x in cache.iterdir()) == sorted(sums)


# ------------------------------------------------------------------- arguments


def test_bad_arguments():
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose one of digits"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="floating-point"):
        load_dataset("digits", dtype=np.int32)
    with pytest.raises(DataError, match="synthetic_size applies to the synthetic dataset only"):
        load_dataset("digits", synthetic_size=(10, 10))
    with pytest.raises(DataError, match="synthetic_size"):
        load_dataset("synthetic", synthetic_size=(0, 10))
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "synthetic")


# -------------------------------------------------------------- digits, synthetic


def test_digits():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1 and ds.num_classes == 10
    assert set(np.unique(ds.y_test)) == set(range(10))
    again = load_dataset("digits", dtype=np.float64)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)


def test_synthetic_small_deterministic_learnable():
    ds = load_dataset("synthetic", synthetic_size=(2000, 500))
    assert ds.x_train.shape == (2000, 784) and ds.x_test.shape == (500, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.num_classes == 10 and set(np.unique(ds.y_train)) == set(range(10))
    again = load_dataset("synthetic", synthetic_size=(2000, 500), dtype=np.float64)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    # learnable: nearest class mean (from train) classifies the test split
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])  # (C, D)
    d2 = ((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1)  # (N, C)
    assert (d2.argmin(1) == ds.y_test).mean() > 0.9


def test_synthetic_default_size():
    ds = load_dataset("synthetic")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)


# --------------------------------------------------------------------- real data


def _located(name, require):
    """The directory the normal lookup finds for ``name``, else skip (or fail in CI)."""
    directory, notes = ds_mod.locate_idx(name)
    if directory is None:
        reason = f"{name} not found (set MPNN_DATA); searched: {', '.join(notes)}"
        if require:
            pytest.fail(f"MPNN_REQUIRE_DATA=1 but {reason}")
        pytest.skip(reason)
    return directory


@pytest.mark.parametrize("name, mean_train, mean_test", [
    ("mnist", 0.1306604762738429, 0.13251460584233699),
    ("fashion-mnist", 0.2860405969887955, 0.28684928071228494),
])
def test_real_data(name, mean_train, mean_test, require_data):
    _located(name, require_data)
    ds = load_dataset(name, download=False)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1
    assert ds.x_test.min() == 0 and ds.x_test.max() == 1
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert ds.x_train.mean(dtype=np.float64) == pytest.approx(mean_train, abs=1e-7)
    assert ds.x_test.mean(dtype=np.float64) == pytest.approx(mean_test, abs=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compact_features_are_the_float_forms_bits(roots, dtype):
    """compact=True keeps uint8 pixels (synthetic: float32); the features a step gathers
    are bit for bit the float form's rows, for every dataset."""
    root = _write_idx_dir(roots["tmp"] / "data", 3, n_train=9, n_test=5)
    rng = np.random.default_rng(0)  # every pixel value, so every division is exercised
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (9, 28, 28), np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28), np.uint8))
    for stale in root.glob("*images*.gz"):
        stale.unlink()
    cases = [("digits", {}), ("synthetic", {"synthetic_size": (50, 7)}),
             ("fashion-mnist", {"data_dir": root})]
    for name, kw in cases:
        whole = load_dataset(name, dtype=dtype, download=False, **kw)
        compact = load_dataset(name, dtype=dtype, download=False, compact=True, **kw)
        stored = np.float32 if name == "synthetic" else np.uint8
        assert compact.x_train.dtype == stored and compact.feature_dtype == dtype
        assert compact.nbytes < whole.nbytes or name == "synthetic" and dtype == np.float32
        rows = np.array([4, 0, 3, 3])
        got = compact.train_features(rows)
        assert got.dtype == dtype and np.array_equal(got, whole.x_train[rows])
        assert np.array_equal(compact.test_features(1, 4), whole.x_test[1:4])
        assert np.array_equal(compact.y_train, whole.y_train)
        assert repr(compact).startswith(f"Dataset({name!r}")
