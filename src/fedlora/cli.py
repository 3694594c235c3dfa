"""The command line: ``fedlora run``, ``fedlora methods``, ``fedlora export`` and ``fedlora node`` (a Flower SuperNode).

Every :class:`fedlora.config.RunConfig` option is a flag (``--local-epochs 2``); ``--config file.toml`` reads a
file first and flags override it; ``--resume RUN_DIR`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from fedlora.config import ConfigError, RunConfig


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a federated fine-tuning job (defaults: embedded MiniLM, WordNet supersenses, 8 clients)",
        description="Run a federated fine-tuning job. Flags override --config; unset flags keep the file's values.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with any of the options below")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after its last checkpoint")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method-specific option, e.g. local_head=false (repeatable)",
    )
    for name, default, text in RunConfig.help_table():
        if name == "method_options":
            continue
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, metavar="VALUE", help=f"{text} (default: {default})")


def _method_options(items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs; values stay strings and are parsed to each option's declared type by the method."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-option {item!r} must look like KEY=VALUE")
        out[key.strip()] = value
    return out


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    flags = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name, None) is not None
    }
    if args.method_option:
        flags["method_options"] = {**cfg.method_options, **_method_options(args.method_option)}
    return RunConfig.from_dict(flags, base=cfg) if flags else cfg


def _methods(name: str | None = None) -> int:
    from fedlora.methods import get_method_class, method_ids
    from fedlora.methods.taxonomy import AREAS, TAXONOMY, taxonomy_of

    if name:
        return _method_detail(get_method_class(name))
    rows = [get_method_class(m).describe() for m in method_ids()]
    groups: dict[tuple[int, str], list[dict[str, str]]] = {}
    for r in rows:
        area, category = taxonomy_of(r["id"])
        groups.setdefault((AREAS.index(area), category), []).append(r)
    cols = ["id", "family", "paper", "weighting", "bytes_up", "bytes_down"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    shown = None
    order = list(dict.fromkeys(TAXONOMY.values()))  # the survey's order of categories
    for key in sorted(groups, key=lambda k: order.index((AREAS[k[0]], k[1]))):
        area, category = AREAS[key[0]], key[1]
        if area != shown:
            print(f"\n== {area}")
            shown = area
        print(f"-- {category}")
        for r in groups[key]:
            print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    print("\nbytes per adapted module: m = out features, n = in features, r = rank (r_k: client k's), K = clients")
    print("in the round; heads = trainable task head. Areas and categories: the survey's taxonomy (Table 1).")
    print("`fedlora methods ID` shows one method in full.")
    return 0


def _method_detail(cls: type) -> int:
    import inspect

    from fedlora.methods import describe_options

    d = cls.describe()
    print(f"{d['id']}" + (f"  (aliases: {', '.join(cls.aliases)})" if cls.aliases else ""))
    from fedlora.methods.taxonomy import taxonomy_of

    print(f"  {'taxonomy':<11} {' / '.join(taxonomy_of(d['id']))}")
    for key in ("family", "paper", "weighting", "up", "down", "bytes_up", "bytes_down"):
        print(f"  {key:<11} {d[key]}")
    flags = [
        f
        for f in (
            "changes_base",
            "has_personal_state",
            "has_global_model",
            "supports_mixed_ranks",
            "supports_robust_aggregation",
        )
        if getattr(cls, f)
    ]
    print(f"  {'traits':<11} {', '.join(flags) or '-'}")
    if cls.extra_adapters:
        print(f"  {'adapters':<11} default + {', '.join(cls.extra_adapters)}")
    if cls.token_gate:
        mixed = ", ".join(ns or "default" for ns in cls.token_gate)
        print(f"  {'gate':<11} a trained token-wise softmax over {mixed} per module (kept by each client)")
    opts = describe_options(cls)
    print("\noptions (--method-option KEY=VALUE):" if opts else "\noptions: none")
    for o in opts:
        extra = f"; one of {', '.join(map(str, o['choices']))}" if o["choices"] else ""
        print(f"  {o['name']} ({o['type']}, default {o['default']!r}{extra})\n      {o['help']}")
    doc = inspect.getmodule(cls).__doc__ or ""
    print("\n" + doc.strip())
    return 0


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's trained model for use without fedlora (merged transformers model, or base + adapter)",
        description="Write a finished run's trained model to OUT: by default one merged transformers model "
        "(AutoModelForSequenceClassification.from_pretrained(OUT)); with --unmerged OUT/base (base weights with the "
        "method's base-weight change) and OUT/adapter (a peft adapter for it). Label names and tokenizer included. "
        "OUT must be new, empty, or an earlier export (replaced).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument(
        "--adapter",
        default="adapter",
        metavar="NAME",
        help="which trained model: adapter (the global one, default) or personal/client-K (client K's own)",
    )
    p.add_argument("--client", type=int, metavar="K", help="client K's own model (same as --adapter personal/client-K)")
    p.add_argument(
        "--unmerged", action="store_true", help="write OUT/base and OUT/adapter (the peft route) instead of merging"
    )


def _export(args: argparse.Namespace) -> int:
    import logging

    from fedlora.data import DataError
    from fedlora.export import export
    from fedlora.models import ModelError
    from fedlora.runs import RunDirError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export(args.run_dir, args.out, adapter=args.adapter, client=args.client, merged=not args.unmerged)
    except (ConfigError, DataError, ModelError, RunDirError) as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfedlora: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    how = "base + adapter (peft)" if args.unmerged else "merged transformers model"
    print(f"exported {args.adapter if args.client is None else f'personal/client-{args.client}'} as {how}: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with LoRA")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    mp = sub.add_parser("methods", help="list the federated methods: id, family, paper, bytes up and down")
    mp.add_argument("id", nargs="?", help="show one method in full: paper, what travels, options, formulas")
    _add_export_parser(sub)
    from fedlora.flower import nodecmd

    nodecmd.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "node":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return nodecmd.main(args)
    if args.command == "methods":
        try:
            return _methods(args.id)
        except ValueError as e:
            print(f"fedlora: error: {e}", file=sys.stderr)
            return 2

    import logging

    from fedlora.api import resume, run
    from fedlora.data import DataError
    from fedlora.federation import RunStalled
    from fedlora.models import ModelError
    from fedlora.runs import RunDirError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.resume:
            given = {
                f.name: getattr(args, f.name)
                for f in dataclasses.fields(RunConfig)
                if getattr(args, f.name, None) is not None
            }
            if args.config or args.method_option:
                raise ConfigError("--resume uses the run's saved configuration; drop --config/--method-option")
            overrides = RunConfig.from_dict(given).to_dict() if given else {}
            result = resume(args.resume, **{k: overrides[k] for k in given})
        else:
            result = run(config_from_args(args))
    except (ConfigError, DataError, ModelError, RunDirError) as e:
        print(f"fedlora: error: {e}", file=sys.stderr)
        return 2
    except RunStalled as e:
        print(f"fedlora: the run failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfedlora: interrupted; resume with `fedlora run --resume <run dir>`", file=sys.stderr)
        return 130
    from fedlora.api import headline_keys

    final = result.final
    keys = dict.fromkeys([*headline_keys(result.config.task), "global_loss"])
    shown = {k: final[k] for k in keys if isinstance(final.get(k), int | float)}
    print(f"done: {result.run_dir}  " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
