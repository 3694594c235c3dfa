"""User-level ε after N rounds for the default job, fedlora's accountant next to dp_accounting called directly.

    .venv/bin/python benchmarks/dp_epsilon.py                      # accounting only (no training), 20 rounds, σ = 1
    .venv/bin/python benchmarks/dp_epsilon.py --run --rounds 20    # also a real run of the default job with DP on

The default job has 8 clients, all sampled every round (fixed-size sampling with m = N: no amplification); the
table adds Poisson sampling at ``--fraction`` (default 0.5), fixed-size sampling of half the clients, and client-side
noise for comparison. Each row is computed twice: by :class:`fedlora.privacy.UserLevelDP` (what ``metrics.jsonl``
reports) and by dp_accounting's accountants built here by hand from the same (σ, sampling, rounds, δ).
``--run`` trains the default job with ``--dp-clip`` and σ and prints the ε its ``metrics.jsonl`` reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import dp_accounting as dpa
from dp_accounting import dp_event as E

from fedlora.privacy import UserLevelDP


def _direct(event, rounds: int, delta: float, relation, kind: str) -> float | None:
    acc = (
        dpa.rdp.RdpAccountant(neighboring_relation=relation)
        if kind == "rdp"
        else dpa.pld.PLDAccountant(neighboring_relation=relation)  # the library's default discretization
    )
    composed = E.SelfComposedDpEvent(event, rounds)
    if not acc.supports(composed):
        return None
    acc.compose(composed)
    return float(acc.get_epsilon(delta))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.5, help="Poisson sampling rate of the extra rows")
    p.add_argument("--run", action="store_true", help="also train the default job with DP on (minutes)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="clip of the --run job")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # the RDP accountant's notes on fractional orders it skips
    n, t, s, d = args.clients, args.rounds, args.noise, args.delta
    add, rep = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, dpa.NeighboringRelation.REPLACE_ONE
    half = max(1, n // 2)
    rows = [
        (
            f"default job: server noise, all {n} clients every round (fixed, m = N)",
            UserLevelDP(clip=1.0, noise=s, num_clients=n, delta=d),
            E.GaussianDpEvent(s),
            add,
        ),
        (
            f"server noise, Poisson sampling q = {args.fraction}",
            UserLevelDP(clip=1.0, noise=s, num_clients=n, sampling="poisson", rate=args.fraction, delta=d),
            E.PoissonSampledDpEvent(args.fraction, E.GaussianDpEvent(s)),
            add,
        ),
        (
            f"server noise, fixed-size {half} of {n} (replace-one, sigma/2)",
            UserLevelDP(clip=1.0, noise=s, num_clients=n, per_round=half, delta=d),
            E.SampledWithoutReplacementDpEvent(n, half, E.GaussianDpEvent(s / 2)),
            rep,
        ),
        (
            "client noise, a client in every round (replace-one, sigma/2)",
            UserLevelDP(clip=1.0, noise=s, num_clients=n, noise_at="client", delta=d),
            E.GaussianDpEvent(s / 2),
            add,
        ),
    ]
    print(f"user-level epsilon after {t} rounds, noise multiplier {s}, delta {d:g}\n")
    print("| setting | fedlora RDP | dp_accounting RDP | fedlora PLD | dp_accounting PLD (default grid) |")
    print("|---|---|---|---|---|")
    for name, dp, event, relation in rows:
        ours = dp.epsilon(t)
        ours_pld = dp.epsilon(t, accountant="pld")
        direct = _direct(event, t, d, relation, "rdp")
        direct_pld = _direct(event, t, d, relation, "pld")
        cells = [name, _fmt(ours), _fmt(direct), _fmt(ours_pld), _fmt(direct_pld)]
        print("| " + " | ".join(cells) + " |")
    if not args.run:
        return
    from fedlora import RunConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(
            rounds=t,
            dp_clip=args.dp_clip,
            dp_noise=s,
            dp_delta=d,
            threads=args.threads,
            progress=False,
            out_dir=tmp,
        )
        print(
            f"\nreal run: default job, {t} rounds, all {cfg.clients} clients per round, clip {args.dp_clip}, noise {s}"
        )
        start = time.perf_counter()
        result = run(cfg)
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        print(
            f"round {r['round']:3d}  epsilon RDP {r['dp_epsilon']:.4f}  PLD {_fmt(r['dp_epsilon_pld'])}  "
            f"accuracy {r.get('global_accuracy', float('nan')):.4f}  clipped {r.get('dp_clipped', 0):.0f}/"
            f"{r['accepted']}  median update norm {r.get('dp_median_norm', float('nan')):.3f}"
        )
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
