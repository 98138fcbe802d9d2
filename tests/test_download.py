"""Download against a local HTTP server: verification, atomicity, mirror fallback."""

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mpnn.data import DataError
from mpnn.data import download as dl

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes, more than one chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/good/<f>: PAYLOAD;  /evil/<f>: other bytes;  /die/<f>: half, then hang up;
    /slow/<f>: 1 KB every 0.1 s (for interrupting);  /steady/<f>: 1 KB every 0.01 s;
    /trickle/<f>: headers, then a byte every 0.1 s;  /trickle-headers/<f>: the status
    line a byte every 0.1 s (each trickle hangs up after 3 s);  else 404."""

    def do_GET(self):
        kind = self.path.strip("/").split("/")[0]
        self.server.hits.append(self.path)
        if kind in ("trickle", "trickle-headers"):
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(PAYLOAD)}\r\n\r\n".encode()
            if kind == "trickle":
                self.wfile.write(head)
            data = head if kind == "trickle-headers" else PAYLOAD
            self.close_connection = True
            try:
                for i in range(30):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up
                pass
            return
        if kind in ("slow", "steady"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            try:
                for start in range(0, len(PAYLOAD), 1024):
                    self.wfile.write(PAYLOAD[start:start + 1024])
                    self.wfile.flush()
                    time.sleep(0.1 if kind == "slow" else 0.01)
            except OSError:  # the client went away
                pass
            return
        if kind not in ("good", "evil", "die"):
            self.send_error(404)
            return
        body = PAYLOAD if kind != "evil" else PAYLOAD[::-1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if kind == "die" else body)
        if kind == "die":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_success(server, tmp_path):
    base, _ = server
    dest = dl.download_file(f"{base}/good/f.gz", tmp_path / "f.gz", SHA, progress=True)
    assert dest.read_bytes() == PAYLOAD
    assert _listing(tmp_path) == ["f.gz"]


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError, match="checksum mismatch") as info:
        dl.download_file(f"{base}/evil/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert f"{base}/evil/f.gz" in str(info.value) and SHA in str(info.value)
    assert _listing(tmp_path) == []


def test_checksum_mismatch_keeps_existing_file(server, tmp_path):
    base, _ = server
    (tmp_path / "f.gz").write_bytes(b"old")
    with pytest.raises(DataError):
        dl.download_file(f"{base}/evil/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert _listing(tmp_path) == ["f.gz"] and (tmp_path / "f.gz").read_bytes() == b"old"


def test_server_dies_mid_file_leaves_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError, match="download failed") as info:
        dl.download_file(f"{base}/die/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert f"{base}/die/f.gz" in str(info.value)
    assert _listing(tmp_path) == []


def test_404_leaves_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError, match="HTTP 404"):
        dl.download_file(f"{base}/missing/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert _listing(tmp_path) == []


def test_interrupt_leaves_nothing(server, tmp_path, monkeypatch):
    base, _ = server

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.download_file(f"{base}/good/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert _listing(tmp_path) == []


def test_unreachable_host(tmp_path):
    # port 9 on localhost: nothing listens there, the connection is refused at once
    with pytest.raises(DataError, match="download failed"):
        dl.download_file("http://127.0.0.1:9/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert _listing(tmp_path) == []


def test_fetch_falls_back_to_next_mirror(server, tmp_path):
    base, httpd = server
    httpd.hits.clear()
    files = {"a.gz": SHA, "b.gz": SHA}
    out = dl.fetch("mnist", tmp_path / "mnist", mirrors=[f"{base}/missing", f"{base}/evil",
                                                          f"{base}/good/"],
                   progress=False, files=files)
    assert _listing(out) == ["a.gz", "b.gz"]
    assert httpd.hits[:3] == ["/missing/a.gz", "/evil/a.gz", "/good/a.gz"]
    httpd.hits.clear()
    dl.fetch("mnist", out, mirrors=[f"{base}/good"], progress=False, files=files)
    assert httpd.hits == []  # verified files already present are kept


def test_fetch_replaces_a_corrupt_existing_file(server, tmp_path):
    base, _ = server
    (tmp_path / "a.gz").write_bytes(b"junk")
    dl.fetch("mnist", tmp_path, mirrors=f"{base}/good", progress=False, files={"a.gz": SHA})
    assert (tmp_path / "a.gz").read_bytes() == PAYLOAD


def test_fetch_all_mirrors_fail_names_each_url(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError) as info:
        dl.fetch("mnist", tmp_path / "new", mirrors=[f"{base}/missing", f"{base}/die"],
                 progress=False, files={"a.gz": SHA})
    message = str(info.value)
    assert f"{base}/missing/a.gz" in message and f"{base}/die/a.gz" in message
    assert _listing(tmp_path) == []  # the directory fetch created is removed again


def test_mirror_env_replaces_defaults(monkeypatch):
    monkeypatch.setenv("MPNN_MIRROR", "http://a/x, http://b/y/")
    assert dl.mirrors_for("mnist") == ["http://a/x/", "http://b/y/"]
    assert dl.mirrors_for("mnist", mirrors="http://c") == ["http://c/"]
    monkeypatch.delenv("MPNN_MIRROR")
    assert dl.mirrors_for("fashion-mnist") == list(dl.MIRRORS["fashion-mnist"])


@pytest.fixture
def fast_stall_limit(monkeypatch):
    """A transfer must bring 300 bytes in each 0.3 s (a trickle brings 3)."""
    monkeypatch.setattr(dl, "MIN_RATE_BPS", 1000)
    monkeypatch.setattr(dl, "STALL_WINDOW_S", 0.3)


@pytest.mark.parametrize("kind", ["trickle", "trickle-headers"])
def test_trickling_mirror_is_given_up(server, tmp_path, fast_stall_limit, kind):
    # a byte every 0.1 s restarts the socket timeout every time: only the rate limit ends it
    base, _ = server
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        dl.download_file(f"{base}/{kind}/f.gz", tmp_path / "f.gz", SHA, progress=False)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert f"{base}/{kind}/f.gz: download too slow" in message, message
    assert "under the minimum of 1000 bytes/s" in message and "MPNN_MIRROR" in message
    assert "--data-dir" in message
    assert elapsed < 2, elapsed  # the trickle itself lasts 3 s
    assert _listing(tmp_path) == []


def test_steady_download_over_many_windows_is_kept(server, tmp_path, fast_stall_limit):
    base, _ = server
    dest = dl.download_file(f"{base}/steady/f.gz", tmp_path / "f.gz", SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and _listing(tmp_path) == ["f.gz"]


def test_fetch_falls_back_from_a_trickling_mirror(server, tmp_path, fast_stall_limit):
    base, httpd = server
    httpd.hits.clear()
    started = time.monotonic()
    out = dl.fetch("mnist", tmp_path / "mnist", mirrors=[f"{base}/trickle", f"{base}/good"],
                   progress=False, files={"a.gz": SHA})
    assert time.monotonic() - started < 2
    assert httpd.hits == ["/trickle/a.gz", "/good/a.gz"]
    assert _listing(out) == ["a.gz"] and (out / "a.gz").read_bytes() == PAYLOAD


def test_checksum_table_is_well_formed():
    for name, files in dl.FILES.items():
        assert set(files) == {f"{stem}.gz" for stem in ("train-images-idx3-ubyte",
                                                        "train-labels-idx1-ubyte",
                                                        "t10k-images-idx3-ubyte",
                                                        "t10k-labels-idx1-ubyte")}, name
        for sha in files.values():
            assert len(sha) == 64 and int(sha, 16) >= 0


def test_unwritable_directory_is_a_data_error(server, tmp_path, monkeypatch):
    base, _ = server

    def refused(**kwargs):  # root ignores permissions: refuse the way a read-only mount does
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(dl.tempfile, "mkstemp", refused)
    with pytest.raises(DataError, match="cannot write into the download directory .*--data-dir"):
        dl.download_file(f"{base}/good/f.gz", tmp_path / "f.gz", SHA, progress=False)


def test_stale_part_files_of_killed_downloads_are_removed(server, tmp_path):
    base, _ = server
    stale, live = tmp_path / ".a.gz.old1.part", tmp_path / ".a.gz.live.part"
    stale.write_bytes(b"half a file")
    live.write_bytes(b"another job's download in progress")
    hours_ago = time.time() - 2 * dl.STALE_PART_S
    os.utime(stale, (hours_ago, hours_ago))
    dl.fetch("mnist", tmp_path, mirrors=f"{base}/good", progress=False, files={"a.gz": SHA})
    assert _listing(tmp_path) == [live.name, "a.gz"]


CTRL_C_RUN = """
import sys
from mpnn.data import datasets, download
download.FILES["mnist"] = {name: sys.argv[1] for name in download.FILES["mnist"]}
datasets.search_dirs = lambda name, data_dir=None: []  # only the (empty) download cache
from mpnn.train import main
sys.exit(main(["--dataset", "mnist", "--quiet"]))
"""


def test_ctrl_c_during_a_download_under_mpirun_ends_the_job(server, tmp_path):
    # rank 0 downloads while rank 1 waits for it in a collective: the interrupt
    # must end both (MPI_Abort), and leave no partial file
    base, _ = server
    env = {k: v for k, v in os.environ.items() if k != "MPNN_DATA"}
    env.update(HOME=str(tmp_path), MPNN_MIRROR=f"{base}/slow", OMP_NUM_THREADS="1")
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    job = subprocess.Popen([mpirun, "-n", "2", sys.executable, "-c", CTRL_C_RUN, SHA],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    cache = tmp_path / ".cache" / "mpnn" / "mnist"
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob(".*.part")):  # the download is under way
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
            time.sleep(0.1)
        job.send_signal(signal.SIGINT)  # Ctrl-C at the terminal reaches mpirun
        out, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0, out
    # mpirun passes SIGINT to every rank; the waiting rank leaves it to rank 0,
    # which removes its partial file, reports and aborts the job
    assert "mpnn.train: interrupted on rank 0; ending the job" in out, out
    assert not list(cache.glob("*")) if cache.exists() else True
