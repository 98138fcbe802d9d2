"""Output paths (--save, --metrics, --trace, --plot) are checked the way they will be
written, before any training: a path that can only fail (or hang) at the end of a run
is refused up front with a message saying what to do."""

import os
import shutil
import subprocess
import sys

import pytest

from mpnn.runtime.files import (
    NAME_MAX,
    PID_DIGITS,
    atomic_write,
    check_output_file,
    remove_stale_temps,
    temp_path,
)

from conftest import train_cli

FAST = ["--dataset", "digits", "--hidden", "16", "--epochs", "1", "--quiet"]


def test_a_fifo_is_refused_instead_of_hanging(tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is a FIFO; mpnn writes its outputs as regular files"):
        check_output_file("--metrics", str(fifo))
    rc, out = train_cli(*FAST, "--metrics", fifo, timeout=60)  # it used to block forever
    assert rc == 2 and "--metrics" in out and "is a FIFO" in out, out


@pytest.mark.parametrize("device", ["/dev/full", "/dev/null"])
def test_device_files_are_refused(device):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist on this system")
    with pytest.raises(ValueError, match="is a character device"):
        check_output_file("--metrics", device)


def test_metrics_to_dev_null_with_plot_fails_before_training(tmp_path):
    rc, out = train_cli(*FAST, "--metrics", "/dev/null", "--plot", tmp_path / "p.png")
    assert rc == 2 and "--metrics /dev/null: is a character device" in out, out
    assert not (tmp_path / "p.png").exists()


def test_a_name_whose_temporary_name_is_too_long_is_refused(tmp_path):
    longest_ok = NAME_MAX - len(".") - len(".") - PID_DIGITS - len(".tmp")
    check_output_file("--save", str(tmp_path / ("w" * longest_ok)))  # fits, with any pid
    too_long = tmp_path / ("w" * 245)  # legal on its own; its temporary name is not
    with pytest.raises(ValueError, match=f"use a name of at most {longest_ok} bytes"):
        check_output_file("--save", str(too_long))
    rc, out = train_cli(*FAST, "--save", too_long)
    assert rc == 2 and "the file name is too long" in out, out


def test_an_immutable_file_is_refused(tmp_path):
    target = tmp_path / "w.npz"
    target.write_bytes(b"old")
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    made = subprocess.run(["chattr", "+i", str(target)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this filesystem or user cannot set the immutable flag: {made.stderr}")
    try:
        with pytest.raises(ValueError, match=r"is immutable \(chattr \+i\)"):
            check_output_file("--save", str(target))
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)


@pytest.mark.parametrize("option", ["--save", "--metrics", "--trace", "--plot", "--resume",
                                    "--init", "--checkpoint-dir"])
def test_empty_paths_are_errors_not_ignored(option):
    rc, out = train_cli(*FAST, option, "")
    assert rc == 2 and f"{option} ''" in out or f"{option} :" in out, out


def test_the_check_probes_the_temporary_name_and_leaves_nothing(tmp_path):
    check_output_file("--save", str(tmp_path / "w.npz"))
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".ckpt-000000005.npz.{dead}.tmp"
    live = tmp_path / f".ckpt-000000006.npz.{os.getpid()}.tmp"
    other = tmp_path / ".notes.txt"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert remove_stale_temps(str(tmp_path)) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_atomic_write_uses_the_checked_temporary_name(tmp_path, monkeypatch):
    seen = []
    real_open = os.open

    def spy(path, *a, **k):
        seen.append(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    atomic_write(str(tmp_path / "w.npz"), lambda f: f.write(b"data"))
    assert seen[0] == temp_path(str(tmp_path / "w.npz"))
