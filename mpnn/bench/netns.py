"""Several "hosts" on this one Linux machine, for real multi-host MPI tests (root only).

Each host is a network namespace with one interface, ``eth0`` (a veth pair whose
other end is on a bridge in a "switch" namespace), entered with its own UTS
(hostname), IPC and mount namespaces; ``/etc/hosts`` is bind-mounted there from
the harness's temporary directory, so every host resolves ``hostA``, ``hostB``,
... to the addresses on the bridge. The filesystem (and so the working directory
and the venv) is the same on every host, as on a cluster with a shared home.

    from mpnn.bench.netns import Hosts, unavailable

    with Hosts(("hostA", "hostB")) as hosts:
        r = hosts.mpirun(["-hosts", "hostA:2,hostB:2", "-n", "4", sys.executable, ...],
                         timeout=60)
        # r.returncode, r.stdout (stdout and stderr together), r.elapsed
        job = hosts.popen([...]); ...; hosts.cut("hostB"); job.wait(60)
        hosts.exec("hostB", ["hostname"]); hosts.tx_rx_bytes("hostA"); hosts.heal("hostB")

``mpirun`` (the venv's, MPICH's hydra) runs inside the first host and launches the
others' proxies through a generated ssh look-alike (``HYDRA_LAUNCHER=ssh
HYDRA_LAUNCHER_EXEC=<dir>/ssh``); hydra calls it as ``ssh -x HOST '"/path/
hydra_pmi_proxy"' ARGS..`` and, as sshd would, the words are joined and run by
``sh -c`` on that host. The whole job is a process tree under ``mpirun`` (there is
no real ssh), so a timeout kills the tree, and ``close()`` kills every process
left in every namespace before deleting them.

What was learnt (MPICH 5.0.2 wheel: hydra, ch4 with UCX 1.20.1 and libfabric):

- The default netmod is UCX (``MPIR_CVAR_DEBUG_SUMMARY=1`` prints "UCX netmod
  Capability"); ranks of one host use MPICH's shared memory, ranks of two hosts
  UCX over TCP on ``eth0``. ``MPIR_CVAR_CH4_NETMOD=ofi`` (``FI_PROVIDER=tcp`` or
  ``sockets``) works too. Without the IPC namespace UCX's shared-memory
  transports treat the hosts as one machine: an 8 MiB Allreduce across them
  moved ~20 KB over eth0 instead of the >= 8 MiB it moves with it.
- A downed link is noticed by nobody: the ranks spin in their collective and
  mpirun waits (UCX keepalive and TCP keepalive settings change nothing; MPICH
  creates its UCX endpoints without error handling). ``MPIR_CVAR_PROGRESS_TIMEOUT=T``
  dumps a wait's pending requests after T s and fails it after 2T s: mpi4py
  raises, and the job ends; the cut host's own ranks stay behind (``close()``
  kills them).
- Unlike ssh, the look-alike does not carry the remote proxy's own stdin and
  stdout/stderr over the network: what a proxy prints (not its ranks' output,
  which hydra forwards over its TCP connection) still arrives after a cut.
- Namespaces are named ``mpnn-mh<pid>-<n>-<host>`` and the subnet comes from
  the pid, so two sets of hosts on one machine do not collide (each also has its
  own switch, so even equal subnets would not meet); the namespaces of a harness
  whose process died are removed by the next one.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
PREFIX = "mpnn-mh"
# entered on every host: its own hostname, IPC objects and /etc/hosts
ENTER = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'


def _run(cmd, timeout=30, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        why = (p.stderr or p.stdout).strip()
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {why}")
    return p


def _netns_list():
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _netns_pids(ns):
    p = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_netns(ns, wait=5.0):
    """SIGKILL every process in network namespace ``ns`` until none is left."""
    end = time.monotonic() + wait
    while (pids := _netns_pids(ns)) and time.monotonic() < end:
        _kill(pids)
        time.sleep(0.05)


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid):
    """Stop, then kill, ``pid`` and every process below it (repeated: no fork escapes)."""
    for _ in range(20):
        tree = [pid, *_descendants(pid)]
        for p in tree:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        _kill(tree)
        if not _descendants(pid):
            return


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale():
    """Remove the namespaces of harnesses whose process is gone (killed before cleanup)."""
    for ns in _netns_list():
        parts = ns.split("-")
        if ns.startswith(PREFIX) and len(parts) >= 3 and parts[1][2:].isdigit():
            if not _alive(int(parts[1][2:])):
                _kill_netns(ns)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@functools.cache
def unavailable():
    """None where hosts can be made here, else why not (a reason to skip with)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid {os.geteuid()})"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} ({package}) not found"
    if not os.access(MPIRUN, os.X_OK):
        return f"no mpirun beside {sys.executable}"
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", ns])
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        return f"cannot create a network namespace ({e})"
    try:
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "p0"])
        _run(["ip", "netns", "exec", ns, "unshare", "--uts", "--ipc", "--mount",
              "--propagation", "private", "--", "/bin/sh", "-c", "hostname probe"])
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        return f"cannot set up a host in a network namespace ({e})"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return None


class Timeout(subprocess.TimeoutExpired):
    """A job that outlived its timeout (its whole process tree was killed)."""

    def __str__(self):
        tail = (self.output or "")[-4000:]
        return f"{super().__str__()}; output so far:\n{tail}"


class Job:
    """One command running inside a host (``Hosts.popen``); output goes to a file."""

    def __init__(self, cmd, env, log_path):
        self.args = cmd
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed once the job has ended
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def output(self):
        """Everything the job has written so far (stdout and stderr together)."""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def poll(self):
        return self.proc.poll()

    def kill(self):
        _kill_tree(self.proc.pid)
        self.proc.wait()
        self._log.close()

    def wait(self, timeout):
        """The finished job as a CompletedProcess (``stdout`` holds stdout and stderr,
        ``elapsed`` the seconds since it started); ``Timeout`` (with the output so
        far) after killing its whole process tree when it outlives ``timeout``."""
        try:
            code = self.proc.wait(max(0.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise Timeout(self.args, timeout, output=self.output()) from None
        self._log.close()
        done = subprocess.CompletedProcess(self.args, code, self.output(), None)
        done.elapsed = time.monotonic() - self.started
        return done


_instances = itertools.count()


class Hosts:
    """Hosts ``names`` (the first runs ``mpirun``), torn down on exit whatever happens."""

    def __init__(self, names=("hostA", "hostB")):
        if reason := unavailable():
            raise RuntimeError(f"cannot make hosts: {reason}")
        self.names = list(names)
        pid, n = os.getpid(), next(_instances)
        key = (pid * 8 + n) & 0xFFFF
        self.subnet = f"10.{key >> 8}.{key & 255}"
        self.address = {h: f"{self.subnet}.{i}" for i, h in enumerate(self.names, 1)}
        self.netns = {h: f"{PREFIX}{pid}-{n}-{h}" for h in self.names}
        self.switch = f"{PREFIX}{pid}-{n}-switch"
        self.jobs = []
        self.closed = False
        reap_stale()
        self.dir = tempfile.mkdtemp(prefix="mpnn-multihost-")
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self):
        self.hosts_file = os.path.join(self.dir, "hosts")
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n")
            f.writelines(f"{a} {h}\n" for h, a in self.address.items())
        with open(os.path.join(self.dir, "hosts.json"), "w") as f:
            json.dump({"netns": self.netns, "address": self.address, "hosts": self.hosts_file}, f)
        self.launcher = os.path.join(self.dir, "ssh")
        with open(self.launcher, "w") as f:
            f.write(f"#!/bin/sh\nexec {sys.executable} {os.path.abspath(__file__)} "
                    f"ssh {self.dir} \"$@\"\n")
        os.chmod(self.launcher, 0o755)
        sw = self.switch
        _run(["ip", "netns", "add", sw])
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i, h in enumerate(self.names, 1):
            ns = self.netns[h]
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # the veth is made inside the host and its peer moved straight into the switch
            _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
                  f"p{i}", "netns", sw])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address[h]}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", sw, "link", "set", f"p{i}", "master", "br0", "up"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Kill every process in every host, delete the namespaces and the directory."""
        if self.closed:
            return
        self.closed = True
        for job in self.jobs:
            if job.poll() is None:
                job.kill()
        for ns in [*self.netns.values(), self.switch]:
            _kill_netns(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)

    # ------------------------------------------------------------ running things

    def command(self, host, cmd):
        """The argv that runs ``cmd`` (a list, or a string for ``sh -c``) on ``host``."""
        return enter(self.netns[host], host, self.hosts_file, cmd)

    def launcher_env(self, env=None):
        return dict(os.environ, HYDRA_LAUNCHER="ssh", HYDRA_LAUNCHER_EXEC=self.launcher,
                    **(env or {}))

    def popen(self, args, env=None, host=None):
        """``mpirun args`` started inside ``host`` (default: the first): a ``Job``."""
        cmd = self.command(host or self.names[0], [MPIRUN, *map(str, args)])
        job = Job(cmd, self.launcher_env(env), os.path.join(self.dir, f"job{len(self.jobs)}.log"))
        self.jobs.append(job)
        return job

    def mpirun(self, args, timeout, env=None, host=None):
        """Run ``mpirun args`` inside ``host`` (default: the first) to the end: a
        CompletedProcess (``stdout``: stdout and stderr, ``elapsed``), or ``Timeout``."""
        return self.popen(args, env, host).wait(timeout)

    def exec(self, host, cmd, timeout=60, env=None):
        """Run ``cmd`` on ``host``: CompletedProcess with text stdout and stderr."""
        return subprocess.run(self.command(host, cmd), capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ, **(env or {})))

    def pids(self, host):
        """The processes running in ``host``'s network namespace."""
        return _netns_pids(self.netns[host])

    # ------------------------------------------------------------ the network

    def cut(self, host):
        """Take ``host``'s link down (its peers see silence: no reset, no error)."""
        _run(["ip", "-n", self.netns[host], "link", "set", "eth0", "down"])

    def heal(self, host):
        _run(["ip", "-n", self.netns[host], "link", "set", "eth0", "up"])

    def tx_rx_bytes(self, host):
        """(tx, rx) byte counters of ``host``'s eth0, read inside its namespace."""
        stats = "/sys/class/net/eth0/statistics"
        p = _run(["ip", "netns", "exec", self.netns[host], "cat", f"{stats}/tx_bytes",
                  f"{stats}/rx_bytes"])
        tx, rx = map(int, p.stdout.split())
        return tx, rx


def enter(ns, hostname, hosts_file, cmd):
    """The argv that runs ``cmd`` in network namespace ``ns`` as host ``hostname``."""
    if isinstance(cmd, str):
        cmd = ["/bin/sh", "-c", cmd]
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "--ipc", "--mount",
            "--propagation", "private", "--", "/bin/sh", "-c", ENTER, "mh", hostname,
            hosts_file, *map(str, cmd)]


def ssh(directory, argv):
    """What hydra's launcher call ``ssh [-x ..] HOST WORDS..`` does: run the words
    with ``sh -c`` on HOST (a name or address of the hosts in ``directory``)."""
    with open(os.path.join(directory, "hosts.json")) as f:
        state = json.load(f)
    while argv and argv[0].startswith("-"):
        argv = argv[1:]
    if not argv:
        sys.exit("ssh: no host")
    host, words = argv[0], argv[1:]
    by_address = {a: h for h, a in state["address"].items()}
    host = by_address.get(host, host)
    if host not in state["netns"]:
        sys.exit(f"ssh: unknown host {host!r} (hosts: {', '.join(state['netns'])})")
    cmd = enter(state["netns"][host], host, state["hosts"], " ".join(words))
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "ssh":
        ssh(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(f"usage: {sys.argv[0]} ssh DIR [-x] HOST WORDS..  (hydra's launcher)")
