"""Factored SVD of a weighted sum of LoRA products vs the dense SVD of the same m×n matrix.

    .venv/bin/python benchmarks/factored_svd.py                 # 4096×4096, K=10 clients, r=16 (target ≥ 100×)
    .venv/bin/python benchmarks/factored_svd.py --m 1024 --n 768 --clients 4 --rank 8

Both paths get the same K terms ``p_k·s·B_k@A_k``. The dense path forms the m×n matrix and calls
``torch.linalg.svd``; the factored path (``fedlora.adapters.factored_svd``) never forms it. The script checks
that both give the same singular values and the same rank-r truncation, then prints the speed-up measured in this
run. It targets no particular machine: the ratio, not the seconds, is the result.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlora.adapters import LowRankTerm, dense_sum, dense_svd, factored_svd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="repetitions of the factored path (median)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(args.clients, generator=gen) + 0.5
    p = p / p.sum()
    scale = 2.0
    terms = [
        LowRankTerm(
            b=torch.randn(args.m, args.rank, generator=gen) / args.rank**0.5,
            a=torch.randn(args.rank, args.n, generator=gen) / args.n**0.5,
            coeff=float(p[k]) * scale,
        )
        for k in range(args.clients)
    ]
    print(f"m={args.m} n={args.n} K={args.clients} r={args.rank} threads={args.threads}")

    factored_svd(terms)  # warm-up
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        fac = factored_svd(terms)
        times.append(time.perf_counter() - t)
    t_fac = statistics.median(times)

    t = time.perf_counter()
    dense = dense_sum(terms)
    t_form = time.perf_counter() - t
    t = time.perf_counter()
    ref = dense_svd(dense)
    t_svd = time.perf_counter() - t
    t_dense = t_form + t_svd

    k = min(args.clients * args.rank, args.m, args.n)
    sv_err = ((fac.s[:k] - ref.s[:k]).abs().max() / ref.s[0]).item()
    trunc = (fac.dense(args.rank) - ref.dense(args.rank)).norm() / ref.dense(args.rank).norm()
    full = (fac.dense() - dense).norm() / dense.norm()
    print(f"dense:    form {t_form:.3f} s + svd {t_svd:.3f} s = {t_dense:.3f} s")
    print(f"factored: {t_fac * 1000:.2f} ms (median of {args.repeat})")
    print(
        f"same result: max |Δσ|/σ1 = {sv_err:.2e}, rank-{args.rank} truncation rel. diff = {trunc:.2e}, "
        f"reconstruction rel. error = {full:.2e}"
    )
    ok = sv_err < 1e-4 and trunc < 1e-3 and full < 1e-4
    speedup = t_dense / t_fac
    print(
        f"speed-up factored vs dense SVD: {speedup:.0f}x (target >= 100x) {'OK' if speedup >= 100 else 'BELOW'}; "
        f"results {'agree' if ok else 'DIFFER'}"
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
