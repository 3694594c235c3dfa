"""``fedlora node``: a Flower SuperNode for one fedlora client, with a worker that keeps its model loaded.

It starts the node worker (:mod:`fedlora.flower.worker`) on a private Unix socket, then ``flower-supernode`` with
``--node-config "partition-id=K num-partitions=N fedlora-worker=<socket>"`` and the connection flags given
(TLS root certificate or ``--insecure``, the SuperNode authentication key), and runs until the SuperNode exits or
the command is stopped (SIGINT/SIGTERM stop the SuperNode it started, by its PID, then the worker).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("fedlora")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node",
        help="run a Flower SuperNode for one client, keeping its model loaded between rounds",
        description=(
            "Start a Flower SuperNode that is client K of a fedlora run (Flower app: flower/), with a worker that "
            "keeps the model, data and method loaded across rounds. Extra arguments after -- go to flower-supernode."
        ),
    )
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--partition-id", type=int, required=True, metavar="K", help="the client this node is (0-based)")
    p.add_argument("--num-partitions", type=int, required=True, metavar="N", help="number of clients in the run")
    p.add_argument(
        "--data",
        metavar="FILE",
        help=(
            "this client's own data: a local CSV/JSON/JSONL/Parquet file with the run's text and label columns "
            "(default: the client's partition of the run's dataset). Its labels must be among the run's labels; "
            "the server learns only how many training examples it holds"
        ),
    )
    p.add_argument(
        "--model",
        metavar="ID_OR_DIR",
        help="serve only this model: a run configured with another model is refused (default: whatever the run names)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=(
            "where the node keeps its client's state between rounds on disk (personal adapters, control variates, "
            "its copy of changed base weights), so that a restarted ServerApp resumes the run; keep it to survive a "
            "restart of the node too (default: a private temporary directory removed when the node stops)"
        ),
    )
    p.add_argument("--port", type=int, default=9094, help="port of this SuperNode's local runtime API (default 9094)")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", metavar="CA.pem", help="CA certificate of the SuperLink's TLS certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (loopback or trusted networks only)")
    p.add_argument(
        "--auth-private-key",
        metavar="KEY",
        help=(
            "this node's ECDSA private key in OpenSSH format (SuperNode authentication: the SuperLink runs with "
            "--enable-supernode-auth and the operator registered KEY.pub with 'flwr supernode register')"
        ),
    )
    p.add_argument("--no-worker", action="store_true", help="no worker: every message rebuilds the model")
    p.add_argument("supernode_args", nargs="*", help="further flower-supernode arguments (after --)")


def _supernode() -> str:
    exe = shutil.which("flower-supernode") or str(Path(sys.executable).with_name("flower-supernode"))
    if not Path(exe).exists():
        raise FileNotFoundError("flower-supernode not found: install Flower with pip install 'fedlora[flower]'")
    return exe


def main(args: argparse.Namespace) -> int:
    from fedlora.flower.worker import start_worker

    if not 0 <= args.partition_id < args.num_partitions:
        print(
            f"fedlora: error: --partition-id {args.partition_id} is outside 0..{args.num_partitions - 1}",
            file=sys.stderr,
        )
        return 2
    for flag, path in (("--root-certificates", args.root_certificates), ("--auth-private-key", args.auth_private_key)):
        if path is not None and not Path(path).is_file():
            print(f"fedlora: error: {flag} {path}: no such file", file=sys.stderr)
            return 2
    node_config = f"partition-id={args.partition_id} num-partitions={args.num_partitions}"
    if args.data is not None:
        data = Path(args.data).expanduser().resolve()
        if not data.is_file():
            print(f"fedlora: error: --data {args.data}: no such file", file=sys.stderr)
            return 2
        node_config += f" fedlora-data={json.dumps(str(data))}"
    if args.model is not None:
        model = Path(args.model).expanduser()
        pinned = str(model.resolve()) if model.exists() else args.model
        node_config += f" fedlora-model={json.dumps(pinned)}"
    tmp = tempfile.mkdtemp(prefix="fedlora-node-")  # 0700: the worker's socket and, by default, the state
    state = Path(args.state_dir).expanduser().resolve() if args.state_dir else Path(tmp) / "state"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_config += f" fedlora-state-dir={json.dumps(str(state))}"
    worker = None
    if not args.no_worker:
        path = os.path.join(tmp, "worker.sock")
        worker = start_worker(path)
        node_config += f" fedlora-worker={json.dumps(path)}"
        log.info("node worker listening on %s", path)
    cmd = [_supernode(), "--superlink", args.superlink, "--port", str(args.port), "--node-config", node_config]
    cmd += ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
    if args.auth_private_key:
        cmd += ["--auth-supernode-private-key", args.auth_private_key]
    cmd += list(args.supernode_args)
    env = dict(os.environ)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # Flower polls its task queue every 1 s by default
    proc = subprocess.Popen(cmd, env=env)

    def stop(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            code = proc.wait()
        if proc.poll() is None:
            proc.kill()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if worker is not None:
            worker.shutdown()
            worker.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else int(code)
