"""One hostile client among eight: for every attack of ``fedlora.federation.attacks``, the final accuracy beside the
run in which that client is dropped (same seed, data and budget), under the run defaults.

    .venv/bin/python benchmarks/hostile_clients.py                       # default model and task, 5 rounds
    .venv/bin/python benchmarks/hostile_clients.py --method ffa_lora --rounds 3

The hostile client is the one with the most training examples (the largest honest weight, the most influence). It
trains honestly, then rewrites its reply. The table shows each attack's accuracy, its gap to the dropped-client run
and which protection acted (rejected, clipped). ``--set KEY=VALUE`` changes any run option (e.g. norm_bound=null to
see an attack without the norm bound).
"""

from __future__ import annotations

import argparse
import json
import time

from fedlora import RunConfig
from fedlora.api import _policy, build, resolve_config
from fedlora.federation import MemoryStore, Schedule, run_federation, start_state
from fedlora.federation.attacks import ATTACKS, HostileRuntime


def _run(cfg: RunConfig, attack: str | None) -> dict:
    setup = build(cfg)
    engine = setup.engine
    hostile = max(range(cfg.clients), key=lambda c: len(engine.clients[c].train))
    runtime = engine if attack is None else HostileRuntime(engine, [hostile], attack)
    store = MemoryStore()
    server = start_state(setup.method, runtime, store, engine.initial, resume=False)
    schedule = Schedule(rounds=cfg.rounds, num_clients=cfg.clients, seed=cfg.seed)
    start = time.perf_counter()
    run_federation(setup.method, runtime, store, schedule, server, policy=_policy(cfg, engine), max_failed_rounds=None)
    final = store.metrics[-1]
    acc_key = "global_accuracy" if "global_accuracy" in final else "personal_accuracy"
    rejected = sum(str(hostile) in r["rejected"] for r in store.metrics)
    clipped = sum(str(hostile) in r.get("clipped", {}) for r in store.metrics)
    return {
        "attack": attack or "none (all honest)",
        "hostile_client": hostile,
        "accuracy": final[acc_key],
        "rejected_rounds": rejected,
        "clipped_rounds": clipped,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="fedit")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attack names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run option")
    p.add_argument("--clean", action="store_true", help="also run with every client honest")
    p.add_argument("--out", help="append one JSON line per run to this file")
    args = p.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    cfg = resolve_config(
        RunConfig.from_dict({"method": args.method, "rounds": args.rounds, "progress": False, "threads": 1, **extra})
    )
    print(
        f"method={cfg.method} rounds={cfg.rounds} norm_bound={cfg.norm_bound} norm_action={cfg.norm_action} "
        f"max_weight_ratio={getattr(cfg, 'max_weight_ratio', None)} aggregator={getattr(cfg, 'aggregator', 'mean')}"
    )
    rows = ([_run(cfg, None)] if args.clean else []) + [_run(cfg, "drop")]
    base = rows[-1]["accuracy"]
    for attack in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        rows.append(_run(cfg, attack))
        print(rows[-1], flush=True)
    print("\n| attack | accuracy | vs dropped (points) | within 2 points | rounds rejected | rounds clipped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gap = 100 * (r["accuracy"] - base)
        print(
            f"| {r['attack']} | {r['accuracy']:.4f} | {gap:+.1f} | {'yes' if abs(gap) <= 2 else 'NO'} "
            f"| {r['rejected_rounds']} | {r['clipped_rounds']} |"
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**r, "method": cfg.method, "vs_dropped": gap}) + "\n")


if __name__ == "__main__":
    main()
