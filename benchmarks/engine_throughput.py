"""Local-engine training throughput vs a plain peft training loop over the same samples and batches.

    .venv/bin/python benchmarks/engine_throughput.py                    # default model and task (target ≥ 0.95)
    .venv/bin/python benchmarks/engine_throughput.py --model PATH --clients 4 --repeat 5

The baseline is the loop anyone would write by hand: a peft model, AdamW over its trainable parameters, the same
batches in the same order, ``loss.backward(); clip; step``. The engine does a full client turn through
``LocalEngine.train`` (plan, load the adapter into the shared model in place, train, read it out, finish). Both
run on the same model in this process, interleaved ``--repeat`` times; the script prints samples/s of each and
their ratio (median over repetitions), measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlora import RunConfig
from fedlora.api import build, resolve_config
from fedlora.methods.base import derive_seed


def plain_peft_loop(setup, client: int, rnd: int) -> int:
    """Hand-written training loop on the same batches the engine uses; returns the samples processed."""
    cfg = setup.config
    model, task, data = setup.model, setup.task, setup.engine.clients[client].train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    seed = derive_seed(cfg.seed, "train", rnd, client)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    seen = 0
    for _ in range(cfg.local_epochs):
        for index in task.batch_indices(len(data), cfg.batch_size, gen):
            batch = task.collate(data, index, setup.pad_id)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            seen += len(index)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="fedit")
    ap.add_argument("--clients", type=int, default=8, help="clients in the partition; all are timed per repeat")
    ap.add_argument("--max-examples-per-label", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = resolve_config(
        RunConfig(
            model=args.model,
            method=args.method,
            clients=args.clients,
            max_examples_per_label=args.max_examples_per_label,
            progress=False,
            threads=args.threads,
        )
    )
    torch.set_num_threads(cfg.threads)
    setup = build(cfg)
    engine, method = setup.engine, setup.method
    server = method.init_server(engine.initial)
    clients = list(range(cfg.clients))
    n_samples = sum(len(engine.clients[c].train) * cfg.local_epochs for c in clients)
    print(
        f"model={cfg.model} method={cfg.method} clients={len(clients)} samples/repeat={n_samples} "
        f"batch={cfg.batch_size} threads={cfg.threads}"
    )

    def run_engine(rnd: int) -> float:
        t = time.perf_counter()
        replies = engine.train([method.plan(rnd, c, server) for c in clients])
        dt = time.perf_counter() - t
        assert all(not isinstance(r, Exception) for r in replies)
        assert sum(r.samples_seen for r in replies) == n_samples
        return n_samples / dt

    def run_plain(rnd: int) -> float:
        engine.slots.load(engine.initial)
        engine.slots.set_trainable(engine.slots.keys)
        t = time.perf_counter()
        seen = sum(plain_peft_loop(setup, c, rnd) for c in clients)
        dt = time.perf_counter() - t
        assert seen == n_samples
        return seen / dt

    run_plain(0)  # warm-up (allocator, kernels)
    eng, plain = [], []
    for rep in range(args.repeat):
        # alternate the order so neither side always runs on a warmer/colder machine
        if rep % 2 == 0:
            plain.append(run_plain(rep))
            eng.append(run_engine(rep))
        else:
            eng.append(run_engine(rep))
            plain.append(run_plain(rep))
        print(f"  repeat {rep + 1}: engine {eng[-1]:.1f} samples/s, plain peft loop {plain[-1]:.1f} samples/s")
    ratio = statistics.median(e / p for e, p in zip(eng, plain, strict=True))
    print(
        f"engine samples/s {statistics.median(eng):.1f} / plain peft loop {statistics.median(plain):.1f}: "
        f"ratio {ratio:.3f} (target >= 0.95) {'OK' if ratio >= 0.95 else 'BELOW'}"
    )


if __name__ == "__main__":
    main()
