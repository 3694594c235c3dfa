"""fedlora's Flower app on Flower's simulation runtime, through ``flwr run``: a SuperLink in simulation mode
(``flower-superlink --simulation``) that the test starts (``FLWR_HOME`` in a temporary directory, a free port),
two simulated SuperNodes on Ray with one CPU each and no GPU. The final adapter, the server's final state and every
metric equal the local engine's for the same seed and configuration, bit for bit: the simulated nodes run the same
client code on the same data partitions (their node config gives partition-id and num-partitions), and the
ServerApp the same run loop.

The app is flower/pyproject.toml with one change: its ClientApp calls fedlora's ClientApp functions through a
probe (``fedlora_probe.py``, written below) that records, per process, each node session it builds and each
message it handles. Ray's actors live for the whole run, so each should build the session (model, data, method) once and
serve every later message with it.

Every process the test starts is stopped by its own PID, and so is every process seen under them (SuperExec, the
simulation runtime, Ray's daemons and actors), within a bounded time, whatever happens; the fixture fails if any
process carrying the test's ``FLWR_HOME`` survives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.flower.loopback import Processes, free_port, wait_port, with_env

pytest.importorskip("flwr")
pytest.importorskip("ray")
if not Path("/proc/self/stat").exists():  # pragma: no cover
    pytest.skip("the process watcher reads Linux /proc", allow_module_level=True)

from fedlora import api  # noqa: E402
from fedlora.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 300
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0"
"""Two simulated SuperNodes (one per client), one CPU and no GPU for each ClientApp: two Ray actors."""

PROBE = '''"""Test probe: fedlora's ClientApp functions, unchanged, behind a ClientApp of this module (the simulation
runtime pickles the ClientApp to its Ray actors, which then import this module), with a line in $FEDLORA_PROBE per
node session built and per message handled ("build PID", "message PID")."""

import os

from flwr.clientapp import ClientApp

from fedlora.flower import app, node, worker


def _record(what):
    with open(os.environ["FEDLORA_PROBE"], "a") as f:
        f.write(f"{what} {os.getpid()}\\n")


class _ProbedSession(node.NodeSession):
    def __init__(self, *args, **kwargs):
        _record("build")
        super().__init__(*args, **kwargs)


_handle_request = worker.handle_request


def _probed_handle_request(*args, **kwargs):
    _record("message")
    return _handle_request(*args, **kwargs)


node.NodeSession = _ProbedSession
worker.handle_request = _probed_handle_request

client_app = ClientApp()


@client_app.query()
def hello(message, context):
    return app.client_hello(message, context)


@client_app.train()
def train(message, context):
    return app.client_train(message, context)


@client_app.evaluate()
def evaluate(message, context):
    return app.client_evaluate(message, context)
'''


@dataclass
class Simulation:
    env: dict[str, str]
    app: Path
    probe: Path

    def run(self, run_config: dict) -> subprocess.CompletedProcess:
        overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in run_config.items())
        cmd = [str(BIN / "flwr"), "run", str(self.app), "sim", "--federation-config", FEDERATION]
        return subprocess.run(
            [*cmd, "--run-config", overrides, "--stream"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )

    def records(self) -> list[tuple[str, int]]:
        lines = self.probe.read_text().split() if self.probe.exists() else []
        return [(what, int(pid)) for what, pid in zip(lines[::2], lines[1::2], strict=True)]


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """A SuperLink in simulation mode; yields a :class:`Simulation` that runs the probed app with a run config."""
    base = tmp_path_factory.mktemp("simulation")
    home = base / "flwr-home"
    home.mkdir()
    app = base / "app"
    app.mkdir()
    pyproject = (ROOT / "flower" / "pyproject.toml").read_text()
    component = 'clientapp = "fedlora.flower.app:client_app"'
    assert component in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace(component, 'clientapp = "fedlora_probe:client_app"'))
    (app / "fedlora_probe.py").write_text(PROBE)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fl-ray-"))  # short: Ray's Unix sockets live under it (108-byte limit)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "CI": "true",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "FEDLORA_PROBE": str(base / "probe.log"),
    }
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs = Processes(env, base, marker=f"FLWR_HOME={home}")
    try:
        sl, sl_log = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--port",
                str(link),
            ],
        )
        wait_port(link, sl, sl_log)
        yield Simulation(env, app, base / "probe.log")
    finally:
        try:
            procs.stop()
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# fedsa_lora: personal B factors in the Context. One method keeps CI short (each flwr run starts Ray and its actors:
# about 35 s of fixed cost); fedit's equality is checked in process and on the loopback deployment.
@pytest.mark.parametrize("method", ["fedsa_lora"])
def test_flwr_run_on_the_simulation_runtime_equals_the_local_engine(simulation, tiny_bert, tmp_path, method):
    rounds = 2
    rc = {
        "model": tiny_bert,
        "clients": 2,
        "rounds": rounds,
        "max-examples-per-label": 20,
        "partition": "dirichlet:1.0",
        "threads": 1,
        "method": method,
        "out-dir": str(tmp_path),
        "run-name": "flower",
    }
    before = len(simulation.records())
    done = simulation.run(rc)
    flower = tmp_path / "flower"
    assert (flower / "summary.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    local = api.run(RunConfig.from_dict({**rc, "run-name": "local", "progress": False}))

    a, b = _metrics(flower), _metrics(local.run_dir)
    assert len(a) == rounds
    for x, y in zip(a, b, strict=True):
        x.pop("seconds"), y.pop("seconds")
        assert x == y  # every metric, bit for bit (fedsa_lora's personal ones are evaluated by the simulated nodes)
    assert a[-1]["accepted"] == 2
    last = f"round-{rounds:04d}"
    fs = load_file(flower / "checkpoints" / last / "server.safetensors")
    ls = load_file(local.run_dir / "checkpoints" / last / "server.safetensors")
    assert fs and fs.keys() == ls.keys() and all(torch.equal(fs[k], ls[k]) for k in fs)
    if method != "fedsa_lora":  # fedsa_lora has no global model: each client's model is its own
        fa = load_file(flower / "adapter" / "adapter_model.safetensors")
        la = load_file(local.run_dir / "adapter" / "adapter_model.safetensors")
        assert fa.keys() == la.keys() and all(torch.equal(fa[k], la[k]) for k in fa)

    # The model stays loaded: each Ray actor built the node session once and served all its messages with it.
    records = simulation.records()[before:]
    builds = [pid for what, pid in records if what == "build"]
    served = Counter(pid for what, pid in records if what == "message")
    per_round = 2 if method == "fedsa_lora" else 1  # train, and the nodes' evaluation of their own models
    assert sum(served.values()) == 2 * (1 + per_round * rounds)  # a hello, then each round's messages, per client
    assert sorted(builds) == sorted(set(served)), (builds, served)  # one build per process that served messages
    assert len(builds) <= 2  # at most one per actor (one CPU each, two clients)


def test_processes_stops_what_runs_under_it_even_in_other_sessions_or_reparented(tmp_path):
    """The stopper itself: a started process with a child in a session of its own (as SuperExec is), and one that
    exits at once leaving an orphan (as Flower's daemons may): stop() ends all of them, each by its PID."""
    marker = f"FEDLORA_PROCS_TEST={tmp_path}"
    env = {**os.environ, "FEDLORA_PROCS_TEST": str(tmp_path)}
    sleeper = f"[{sys.executable!r}, '-c', 'import time; time.sleep(600)']"
    spawn = f"import subprocess; subprocess.Popen({sleeper}, start_new_session=True)"
    procs = Processes(env, tmp_path, marker=marker)
    try:
        procs.start("parent", [sys.executable, "-c", f"{spawn}; import time; time.sleep(600)"])
        procs.start("orphaner", [sys.executable, "-c", spawn])
        deadline = time.monotonic() + 30
        while len(with_env(marker)) < 3 and time.monotonic() < deadline:  # the parent and the two sleepers
            time.sleep(0.1)
        assert len(with_env(marker)) == 3
        procs.stop(timeout=5)
        assert not with_env(marker) and not procs.alive()
    finally:
        for pid in with_env(marker):  # only if stop() failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)
