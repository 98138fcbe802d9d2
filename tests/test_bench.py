"""Smoke tests of ``python -m mpnn.bench``: tiny runs, the figures' arithmetic."""

from __future__ import annotations

import json

import pytest

from mpnn import bench


def test_step_flops():
    nominal, executed = bench.step_flops(2)
    macs = 784 * 256 + 256 * 128 + 128 * 64 + 64 * 10
    assert nominal == 6 * 2 * macs
    assert executed == nominal - 2 * 2 * 784 * 256  # no input gradient for the first layer


def test_paired_ratio_is_the_median_of_pairs():
    samples = {"a": [10.0, 20.0, 30.0], "b": [5.0, 20.0, 10.0]}
    assert bench.paired_ratio(samples, "a", "b") == 2.0
    assert bench.paired_ratio(samples, "a", "b", scale=0.5) == 1.0


def test_serial_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--batches", "8,16", "--repeats", "1", "--block-s", "0.01",
                         "--backends", "numpy,numba", "--no-dp", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["samples_per_s"]) == {"8", "16"}
    assert data["samples_per_s"]["8"]["numba"] > 0
    assert data["numba_step_flops"]["16"]["executed_fraction"] > 0
    assert report["data_parallel"] is None


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit, match="unknown backend"):
        bench.main(["--backends", "numpy,fortran", "--no-dp"])


def test_dp_measurement_under_mpirun(tmp_path):
    """The bench launches mpirun -n 2 itself; the replicas must agree."""
    args = bench.parse_args(["--repeats", "1", "--block-s", "0.01", "--dp-batch", "16"])
    dp = bench.run_dp(args)
    if isinstance(dp, str) and "not found" in dp:
        pytest.skip(dp)
    assert isinstance(dp, dict), dp
    assert dp["replicas_identical"]
    for mode in ("single", "none", "blocking", "overlapped"):
        assert dp[mode]["per_rank_samples_s"] > 0
