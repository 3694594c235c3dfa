"""Every registered method on the default task with the same seed and budget: final accuracy, bytes, seconds.

    .venv/bin/python benchmarks/methods_accuracy.py                      # all methods, default budget
    .venv/bin/python benchmarks/methods_accuracy.py --methods fedit,flora --rounds 5 --max-examples-per-label 300

Methods built for heterogeneous ranks also run with ``--client-ranks`` (default 2,4,8); FedIT runs first and every
row also prints its accuracy relative to FedIT's, measured in the same invocation. Results go to stdout as a
Markdown table and, with ``--out FILE``, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from fedlora import RunConfig, run
from fedlora.methods import get_method_class, method_ids


def _cases(methods: list[str], ranks: str) -> list[tuple[str, dict]]:
    cases: list[tuple[str, dict]] = []
    for m in methods:
        cls = get_method_class(m)
        if m in ("hetlora", "pad_zero", "pad_replicate"):
            cases.append((m, {"client_ranks": ranks}))
            continue
        cases.append((m, {}))
        if cls.supports_mixed_ranks:
            cases.append((m, {"client_ranks": ranks}))
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(method_ids()), help="comma-separated method ids (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-examples-per-label", type=int, default=100)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--client-ranks", default="2,4,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="default")
    p.add_argument("--out", help="append one JSON line per run to this file")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "fedit" in methods:
        methods.remove("fedit")
    methods.insert(0, "fedit")
    rows = []
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for method, extra in _cases(methods, args.client_ranks):
            cfg = RunConfig(
                model=args.model,
                method=method,
                rounds=args.rounds,
                clients=args.clients,
                max_examples_per_label=args.max_examples_per_label,
                partition=args.partition,
                seed=args.seed,
                threads=args.threads,
                progress=False,
                out_dir=tmp,
                **extra,
            )
            start = time.perf_counter()
            result = run(cfg)
            seconds = time.perf_counter() - start
            final = result.final
            acc = final.get("global_accuracy", final.get("personal_accuracy"))
            row = {
                "method": method,
                "client_ranks": extra.get("client_ranks", "-"),
                "global_accuracy": final.get("global_accuracy"),
                "personal_accuracy": final.get("personal_accuracy"),
                "bytes_up": sum(h["bytes_up"] for h in result.history),
                "bytes_down": sum(h["bytes_down"] for h in result.history),
                "seconds": round(seconds, 1),
            }
            if method == "fedit" and not extra:
                baseline = acc
            row["vs_fedit"] = round(acc / baseline, 3) if baseline and acc is not None else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**row, "rounds": args.rounds, "seed": args.seed}) + "\n")
    print(f"\n{args.clients} clients, {args.partition}, {args.rounds} rounds, {args.max_examples_per_label}/label")
    print("| method | client ranks | global acc | personal acc | vs fedit | MB up | MB down | s |")
    print("|---|---|---|---|---|---|---|---|")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        print(
            f"| {r['method']} | {r['client_ranks']} | {fmt(r['global_accuracy'])} | {fmt(r['personal_accuracy'])} | "
            f"{fmt(r['vs_fedit'])} | {r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
