"""A real Flower deployment on loopback: a SuperLink and two ``fedlora node`` SuperNodes as separate processes
(``FLWR_HOME`` in a temporary directory, distinct free ports), then ``flwr run`` of the app in flower/. The final
adapter and every metric equal the local engine's for the same seed and configuration, bit for bit: the nodes run
the same client code on the same data, and the ServerApp the same run loop (tests/test_flower.py checks more
methods in process).

Every process the test starts is stopped by its own PID (then its process group, for the children Flower
starts), within a bounded time, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

from fedlora import api  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} not open after {timeout} s: {log.read_text()[-2000:]}")


class Processes:
    """Processes started in their own sessions; stop() ends each by its PID, then what it left in its group."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.procs = env, logs, []

    def start(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):  # children Flower started share the group
                os.killpg(proc.pid, signal.SIGKILL)
        assert all(p.poll() is not None for p in self.procs)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """A SuperLink and two fedlora nodes on loopback; yields a function that runs the app with a run config."""
    base = tmp_path_factory.mktemp("loopback")
    home = base / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "CI": "true",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
    }
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs = Processes(env, base)
    try:
        sl, sl_log = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--port",
                str(link),
                "--database",
                str(home / "state.db"),
            ],
        )
        wait_port(link, sl, sl_log)
        for k in range(2):
            port = free_port()
            node, node_log = procs.start(
                f"node{k}",
                [
                    str(BIN / "fedlora"),
                    "node",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(port),
                    "--partition-id",
                    str(k),
                    "--num-partitions",
                    "2",
                    "--insecure",
                ],
            )
            wait_port(port, node, node_log)

        def run(run_config: dict) -> subprocess.CompletedProcess:
            overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in run_config.items())
            return subprocess.run(
                [str(BIN / "flwr"), "run", str(ROOT / "flower"), "loopback", "--run-config", overrides, "--stream"],
                env=env,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )

        yield run
    finally:
        procs.stop()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,extra", [("fedit", {}), ("fedsa_lora", {}), ("flexlora", {"client-ranks": "2,4"})])
def test_a_loopback_deployment_equals_the_local_engine(loopback, tiny_bert, tmp_path, method, extra):
    rc = {
        "model": tiny_bert,
        "clients": 2,
        "rounds": 2,
        "max-examples-per-label": 20,
        "partition": "dirichlet:1.0",
        "threads": 1,
        "method": method,
        "out-dir": str(tmp_path),
        "run-name": "flower",
        **extra,
    }
    done = loopback(rc)
    flower = tmp_path / "flower"
    assert (flower / "summary.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    local = api.run(RunConfig.from_dict({**rc, "run-name": "local", "progress": False}))
    a, b = _metrics(flower), _metrics(local.run_dir)
    for x, y in zip(a, b, strict=True):
        x.pop("seconds"), y.pop("seconds")
        assert x == y
    assert a[-1]["accepted"] == 2
    if method != "fedsa_lora":
        fa = load_file(flower / "adapter" / "adapter_model.safetensors")
        la = load_file(local.run_dir / "adapter" / "adapter_model.safetensors")
        assert fa.keys() == la.keys() and all(torch.equal(fa[k], la[k]) for k in fa)
