"""FFA-LoRA vs FedIT under user-level DP: accuracy of the default task at ε = 1, 4, 8 (noise calibrated).

    .venv/bin/python benchmarks/dp_methods.py --threads 1                 # default job, 5 rounds, ε 1, 4, 8
    .venv/bin/python benchmarks/dp_methods.py --eps 8 --rounds 3 --max-examples-per-label 50   # quick look

Every run has the same seed, data split and budget (the default job: 8 clients, all sampled every round, server-side
noise, δ = 1e-5); for each ε the noise multiplier is calibrated with the RDP accountant to spend exactly that ε in
``--rounds`` rounds. The clip C is, per method, the median update norm of a first round without DP (``--clip
auto``, the default: measured by a one-round run with clipping and noise off, whose ``dp_median_norm`` is the
median over the clients) or a fixed ``--clip``. Choosing C from the clients' own updates is itself not private; it is
the usual way to set it in a study like this. A run without DP is the reference. Results: a Markdown table on stdout
and, with ``--out FILE``, JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from fedlora import RunConfig, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="ffa_lora,fedit")
    p.add_argument("--eps", default="1,4,8", help="comma-separated target epsilons")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-examples-per-label", type=int, default=None, help="default: the default job's 300")
    p.add_argument("--clip", default="auto", help="'auto' (median update norm of a first round) or a number")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="default")
    p.add_argument("--out", help="append one JSON line per run to this file")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [float(e) for e in args.eps.split(",") if e.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:

        def config(method: str, **kw) -> RunConfig:
            base = dict(
                model=args.model,
                method=method,
                rounds=args.rounds,
                clients=args.clients,
                max_examples_per_label=args.max_examples_per_label,
                seed=args.seed,
                threads=args.threads,
                dp_delta=args.delta,
                progress=False,
                out_dir=tmp,
            )
            return RunConfig(**{**base, **kw})

        for method in methods:
            if args.clip == "auto":
                probe = run(config(method, rounds=1, dp_clip=1e9, dp_noise=0.0))
                clip = float(probe.final["dp_median_norm"])
                print(f"{method}: clip C = {clip:.4f} (median update norm of round 1 without DP)", flush=True)
            else:
                clip = float(args.clip)
            for target in [None, *targets]:
                cfg = config(method) if target is None else config(method, dp_clip=clip, dp_target_epsilon=target)
                start = time.perf_counter()
                result = run(cfg)
                final = result.final
                row = {
                    "method": method,
                    "target_epsilon": target,
                    "epsilon": final.get("dp_epsilon"),
                    "epsilon_pld": final.get("dp_epsilon_pld"),
                    "noise": result.config.dp_noise,
                    "clip": clip if target is not None else None,
                    "rounds": len(result.history),
                    "global_accuracy": final.get("global_accuracy"),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print("\n| method | target ε | ε (RDP) | ε (PLD) | noise σ | clip C | global accuracy | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:

        def f(x, spec: str = ".4f") -> str:
            return "-" if x is None else format(x, spec)

        cells = [
            r["method"],
            "no DP" if r["target_epsilon"] is None else f(r["target_epsilon"], "g"),
            f(r["epsilon"]),
            f(r["epsilon_pld"]),
            f(r["noise"]),
            f(r["clip"]),
            f(r["global_accuracy"]),
            f(r["seconds"], ".0f"),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
