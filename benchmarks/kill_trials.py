"""Crash safety, measured: kill -9 a run at random moments, resume it, and compare its final adapters with an
uninterrupted run's, bit for bit.

    .venv/bin/python benchmarks/kill_trials.py                         # 10 trials, default model, small budget
    .venv/bin/python benchmarks/kill_trials.py --trials 4 --methods fedit --rounds 3

Each trial starts ``fedlora run`` in its own process and sends SIGKILL at one of three kinds of moment:
``before-round-1`` (as soon as the run directory exists, before its round-0 checkpoint), ``checkpoint-write`` (as
soon as a checkpoint's temporary directory appears) or ``random`` (a uniformly drawn second of the reference run's
wall time). It then runs ``fedlora run --resume`` until the run finishes (killing again is not needed) and compares
every tensor of ``adapter/``, ``personal/`` and ``base_delta.safetensors`` with the reference run's. Prints a
Markdown table; exits non-zero if any trial differs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def _args(out: Path, name: str, method: str, rounds: int, extra: list[str]) -> list[str]:
    return [
        *FEDLORA,
        "run",
        "--out-dir",
        str(out),
        "--run-name",
        name,
        "--method",
        method,
        "--rounds",
        str(rounds),
        "--progress",
        "false",
        "--threads",
        "1",
        *extra,
    ]


def _tensors(run: Path) -> dict[str, object]:
    """Every final tensor of a run, by file and key."""
    out = {}
    for f in sorted(run.rglob("*.safetensors")):
        rel = f.relative_to(run)
        if rel.parts[0] == "checkpoints":
            continue
        for k, v in load_file(str(f)).items():
            out[f"{rel}:{k}"] = v
    return out


def _same(a: dict, b: dict) -> tuple[bool, str]:
    if set(a) != set(b):
        return False, f"files/keys differ: {sorted(set(a) ^ set(b))[:3]}"
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not bool((a[k] == b[k]).all()):
            return False, f"{k} differs"
    return True, f"{len(a)} tensors equal"


def _moment(run: Path, kind: str, elapsed: float, at: float) -> bool:
    """Has the moment of a ``kind`` kill come?"""
    ckpts = run / "checkpoints"
    if kind == "before-round-1":  # the configuration is written, the round-0 checkpoint not yet
        return (run / "config.json").exists() and not (ckpts / "round-0000").exists()
    if kind == "checkpoint-write":  # a checkpoint's temporary directory is being written
        try:
            return any(p.name.endswith(".tmp") for p in ckpts.iterdir())
        except OSError:
            return False
    return elapsed >= at


def _kill_when(proc: subprocess.Popen, run: Path, kind: str, at: float) -> str:
    """SIGKILL ``proc`` at the moment ``kind`` asks for; returns what was observed when it was killed."""
    start = time.perf_counter()
    while proc.poll() is None and not _moment(run, kind, time.perf_counter() - start, at):
        time.sleep(0.0005 if kind != "random" else 0.01)
    if proc.poll() is not None:
        return "finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run / "checkpoints").glob("round-*")) if (run / "checkpoints").is_dir() else []
    return f"killed at {time.perf_counter() - start:.2f}s; checkpoints: {', '.join(done) or 'none'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--methods", default="fedit,fedex_lora,fedsa_lora", help="cycled over the trials")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument(
        "--run-args",
        default="--max-examples-per-label 60 --keep-checkpoints 2",
        help="further `fedlora run` flags for every run",
    )
    args = p.parse_args()
    extra = args.run_args.split()
    methods = [m for m in args.methods.split(",") if m]
    rng = random.Random(args.seed)
    env = {**os.environ, "CI": "true"}
    rows, ok_all = [], True
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        refs: dict[str, tuple[dict, float]] = {}
        for m in methods:
            t0 = time.perf_counter()
            subprocess.run(_args(out, f"ref-{m}", m, args.rounds, extra), env=env, check=True, capture_output=True)
            refs[m] = (_tensors(out / f"ref-{m}"), time.perf_counter() - t0)
            print(f"reference {m}: {refs[m][1]:.1f}s, {len(refs[m][0])} tensors", flush=True)
        kinds = ["before-round-1", "checkpoint-write"] + ["random"] * max(0, args.trials - 2)
        for i in range(args.trials):
            m = methods[i % len(methods)]
            kind = kinds[i] if i < len(kinds) else "random"
            at = rng.uniform(0, refs[m][1])
            name = f"trial-{i}"
            run = out / name
            proc = subprocess.Popen(
                _args(out, name, m, args.rounds, extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            seen = _kill_when(proc, run, kind, at)
            if seen == "finished before the kill":
                resumed = "not needed"
            else:
                r = subprocess.run([*FEDLORA, "run", "--resume", str(run)], env=env, capture_output=True, text=True)
                resumed = f"exit {r.returncode}" + (f": {r.stderr.strip().splitlines()[-1]}" if r.returncode else "")
            same, why = _same(refs[m][0], _tensors(run)) if run.is_dir() else (False, "no run directory")
            ok_all &= same
            rows.append((i, m, kind + (f" ({at:.1f}s)" if kind == "random" else ""), seen, resumed, same, why))
            print(rows[-1], flush=True)
    print("\n| trial | method | kill moment | state at the kill | resume | bit-identical | detail |")
    print("|---|---|---|---|---|---|---|")
    for i, m, kind, seen, resumed, same, why in rows:
        print(f"| {i} | {m} | {kind} | {seen} | {resumed} | {'yes' if same else 'NO'} | {why} |")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
