"""A whole Flower deployment on this machine: a SuperLink and ``fedlora node`` SuperNodes as separate processes on
loopback, in a private ``FLWR_HOME`` (tests, benchmarks, trying a deployment before using several machines).

Every process is started in its own session. :class:`Processes` watches the process tree under what it started
(Linux ``/proc``), because Flower's processes start more processes: a SuperLink starts a SuperExec in a session of
its own, which starts the ServerApp or the simulation runtime, whose Ray backend starts daemons and actors, and
some of them outlive their parent for a moment. It remembers every process it saw with its start time (a reused
PID is never signalled), finds the ones that were reparented by a marker in their environment (the deployment's
own ``FLWR_HOME``), and stops each by its PID within a bounded time.

    with Deployment(workdir, nodes=2) as dep:
        dep.run({"method": "fedit", "rounds": 2})
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
APP_DIR = Path(__file__).resolve().parents[3] / "flower"
"""The Flower app of a source checkout (``flower/pyproject.toml``)."""


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    """``flwr run --run-config`` text for these overrides (strings quoted, booleans in TOML's lower case)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in run_config.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait until ``port`` accepts connections (raises if ``proc`` exits first or the time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} not open after {timeout} s: {log.read_text()[-2000:]}")


PROC = Path("/proc")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent PID, start time in clock ticks) of a live process, or None."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    """Every live PID (none where there is no ``/proc``: then only the started processes are stopped)."""
    if not PROC.is_dir():  # pragma: no cover - not Linux
        return []
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def running(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs (a zombie has ended)."""
    st = _stat(pid)
    return st is not None and st[2] == started and st[0] != "Z"


def with_env(marker: str) -> dict[int, int]:
    """Live processes whose environment holds ``marker`` (``NAME=value``): PID → start time."""
    needle = marker.encode() + b"\0"
    found = {}
    for pid in _pids():
        try:
            env = (PROC / str(pid) / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        st = _stat(pid)
        if st is not None and st[0] != "Z" and (env.startswith(needle) or b"\0" + needle in env):
            found[pid] = st[2]
    return found


class Processes:
    """Processes started in their own sessions; :meth:`stop` ends them and everything seen under them.

    ``marker`` (``NAME=value`` in the environment of every process started) finds descendants that left the
    tree before the watcher saw them. ``stop`` raises if any of them survives.
    """

    def __init__(self, env: Mapping[str, str], logs: Path, *, marker: str | None = None, poll: float = 0.2) -> None:
        self.env, self.logs, self.marker, self.poll = dict(env), logs, marker, poll
        self.procs: list[subprocess.Popen] = []
        self.seen: dict[int, int] = {}
        """PID → start time of every process seen under the started ones."""
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, name: str, cmd: Sequence[str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                list(cmd), env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        self.track()
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="flower-procs-watcher", daemon=True)
            self._watcher.start()
        return proc, log

    def track(self) -> None:
        """Add every live process under the started ones (and under those already seen) to :attr:`seen`."""
        table = {pid: st for pid in _pids() if (st := _stat(pid)) is not None}
        with self._lock:
            roots = {p.pid for p in self.procs} | {pid for pid, t in self.seen.items() if running(pid, t)}
            children: dict[int, list[int]] = {}
            for pid, (_, ppid, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            todo = list(roots)
            while todo:
                for child in children.get(todo.pop(), ()):
                    if child not in self.seen and child in table:
                        self.seen[child] = table[child][2]
                        todo.append(child)
            if self.marker:
                self.seen.update(with_env(self.marker))
            for p in self.procs:
                self.seen.pop(p.pid, None)  # the started ones are handled through their Popen

    def _watch(self) -> None:
        while not self._done.wait(self.poll):
            with contextlib.suppress(Exception):
                self.track()

    def alive(self) -> list[int]:
        """PIDs of the started processes and of those seen under them that still run."""
        self.track()
        with self._lock:
            seen = [pid for pid, t in self.seen.items() if running(pid, t)]
        return [p.pid for p in self.procs if p.poll() is None] + seen

    def _signal_seen(self, sig: int) -> None:
        with self._lock:
            items = list(self.seen.items())
        for pid, started in items:
            if running(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def _wait_seen(self, deadline: float) -> None:
        while time.monotonic() < deadline and any(running(pid, t) for pid, t in list(self.seen.items())):
            time.sleep(0.1)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to each started process, then to what runs under them; SIGKILL to any left after ``timeout``
        seconds. Raises RuntimeError naming whatever still runs."""
        self.track()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.track()
        self._done.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._signal_seen(signal.SIGTERM)
        self._wait_seen(time.monotonic() + 10)
        self._signal_seen(signal.SIGKILL)
        self._wait_seen(time.monotonic() + 10)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # what is left in the group
                os.killpg(proc.pid, signal.SIGKILL)
        left = [pid for pid, t in self.seen.items() if running(pid, t)]
        left += [p.pid for p in self.procs if p.poll() is None]
        if self.marker:
            left += [pid for pid in with_env(self.marker) if pid not in left]
        if left:
            raise RuntimeError(f"processes still running after stop(): {left}")


class Deployment:
    """An insecure loopback deployment: a SuperLink and ``nodes`` fedlora nodes (``node_args``: extra ``fedlora
    node`` arguments, e.g. ``["--no-worker"]``)."""

    def __init__(self, workdir: Path, *, nodes: int = 2, node_args: Sequence[str] = (), name: str = "loopback"):
        self.workdir, self.nodes, self.node_args, self.name = Path(workdir), nodes, list(node_args), name
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
        }
        self.procs = Processes(self.env, self.workdir, marker=f"FLWR_HOME={self.home}")
        self.link = free_port()

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.procs.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop()

    def start(self) -> None:
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.name}"\n\n[superlink.{self.name}]\n'
            f'address = "127.0.0.1:{self.link}"\ninsecure = true\n'
        )
        sl, log = self.procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--port",
                str(self.link),
                "--database",
                str(self.home / "state.db"),
            ],
        )
        wait_port(self.link, sl, log)
        for k in range(self.nodes):
            port = free_port()
            cmd = [str(BIN / "fedlora"), "node", "--superlink", f"127.0.0.1:{self.link}", "--port", str(port)]
            cmd += ["--partition-id", str(k), "--num-partitions", str(self.nodes), "--insecure", *self.node_args]
            node, log = self.procs.start(f"node{k}", cmd)
            wait_port(port, node, log)

    def run(self, run_config: Mapping[str, Any], *, timeout: float = 1800) -> subprocess.CompletedProcess:
        """``flwr run`` of the app with these run-config overrides, streaming its logs until it ends."""
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(APP_DIR), self.name, "--run-config", run_config_arg(run_config), "--stream"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
