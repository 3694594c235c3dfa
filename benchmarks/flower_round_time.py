"""Per-round time of a Flower deployment on loopback: ``fedlora node`` (a worker keeps the model, data and method
loaded across rounds) against a FlowerTune-style ClientApp that rebuilds them in every message.

    .venv/bin/python benchmarks/flower_round_time.py                 # default model (MiniLM), 2 nodes, 4 rounds
    .venv/bin/python benchmarks/flower_round_time.py --rounds 3 --model tests-tiny

Both runs use the same SuperLink setup, app, run config and client code; the baseline nodes run with
``--no-worker``, so Flower's SuperNode starts a new ClientApp process for each message (as it always does) and that
process imports torch/transformers/peft, loads the model, partitions the data and builds the method before
training: what a stock FlowerTune ClientApp does in its ``client_fn`` every round. A round's time is the server's
``seconds`` in ``metrics.jsonl`` (plans out, replies in, aggregation, global evaluation). The first round of the
worker run includes building its session, so the table reports it apart from the steady rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedlora.flower.loopback import Deployment


def _round_seconds(run_dir: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def measure(workdir: Path, label: str, node_args: list[str], run_config: dict) -> tuple[list[float], float]:
    out = workdir / label
    out.mkdir()
    with Deployment(out / "deployment", nodes=run_config["clients"], node_args=node_args) as dep:
        start = time.perf_counter()
        done = dep.run({**run_config, "out-dir": str(out), "run-name": "run"})
        wall = time.perf_counter() - start
    if not (out / "run" / "summary.json").exists():
        raise RuntimeError(f"{label}: the run did not finish:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return _round_seconds(out / "run"), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--model", default="default", help="'default' (MiniLM), 'tests-tiny' (a tiny random BERT), a path")
    p.add_argument("--max-examples-per-label", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedlora-flower-bench-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model == "tests-tiny":
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import _build_tiny_bert

            model = _build_tiny_bert(workdir / "tiny")
        run_config = {
            "model": model,
            "clients": args.clients,
            "rounds": args.rounds,
            "max-examples-per-label": args.max_examples_per_label,
            "threads": 1,
            "method": "fedit",
        }
        rows = {}
        for label, node_args in (("worker (fedlora node)", []), ("rebuild per message", ["--no-worker"])):
            print(f"measuring: {label} ...", flush=True)
            rows[label] = measure(workdir, label.split()[0], node_args, run_config)
    print(f"\n{args.clients} nodes on loopback, model {args.model}, {args.rounds} rounds of fedit, 1 thread per node")
    print(f"{'client side':24s} {'round 1 (s)':>12s} {'later rounds, mean (s)':>23s} {'run wall (s)':>13s}")
    for label, (seconds, wall) in rows.items():
        later = statistics.mean(seconds[1:]) if len(seconds) > 1 else float("nan")
        print(f"{label:24s} {seconds[0]:12.2f} {later:23.2f} {wall:13.1f}")
    (w, _), (b, _) = rows.values()
    print(
        f"\nper-round speed-up of the worker (later rounds): {statistics.mean(b[1:]) / statistics.mean(w[1:]):.2f}x; "
        f"over all rounds: {sum(b) / sum(w):.2f}x"
    )


if __name__ == "__main__":
    main()
