"""Print (or, with --write, refresh in README.md) the tables of every `fedlora run` option and every method, and
(with --write) the run config of the Flower app in flower/pyproject.toml: Flower accepts only the keys an app
declares, so the app declares every `fedlora run` option with its default."""

from __future__ import annotations

import sys
from pathlib import Path

from fedlora.config import RunConfig

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
METHODS_BEGIN, METHODS_END = "<!-- methods:begin -->", "<!-- methods:end -->"
FLOWER_BEGIN, FLOWER_END = "# options:begin", "# options:end"
ROOT = Path(__file__).resolve().parents[1]


def _toml_value(value: object) -> str:
    """A TOML value Flower can carry (no null, no lists, no tables): None as "null", lists comma-separated, a
    dict as a JSON string; ``fedlora.config`` parses them back exactly as it parses command-line strings."""
    import json

    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return json.dumps(",".join(value))
    if isinstance(value, dict):
        return json.dumps(json.dumps(value))
    return json.dumps(str(value))


def flower_config() -> str:
    """The ``[tool.flwr.app.config]`` lines: every `fedlora run` option, then the Flower app's own keys."""
    import dataclasses

    from fedlora.flower.app import FLOWER_DEFAULTS, FLOWER_KEYS

    lines = []
    for f in dataclasses.fields(RunConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "progress":
            continue  # a ServerApp has no terminal
        lines.append(f"{f.name.replace('_', '-')} = {_toml_value(default)}")
    for key in FLOWER_KEYS:
        lines.append(f"{key} = {_toml_value(FLOWER_DEFAULTS[key])}  # {FLOWER_KEYS[key]}")
    return "\n".join(lines)


def table() -> str:
    rows = ["| option (`--flag` / TOML key) | default | meaning |", "|---|---|---|"]
    for name, default, text in RunConfig.help_table():
        flag = "--" + name.replace("_", "-") if name != "method_options" else "--method-option KEY=VALUE"
        rows.append(f"| `{flag}` / `{name}` | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(rows)


def methods_table() -> str:
    """One row per registered method, in the survey's taxonomy order (area / category): family, paper, weighting,
    bytes up/down per module, options."""
    from fedlora.methods import describe_options, get_method_class, method_ids
    from fedlora.methods.taxonomy import TAXONOMY, taxonomy_of

    rows = [
        "| id | survey area / category | family | paper | default weighting | up per module | down per module "
        "| options |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(dict.fromkeys(TAXONOMY.values()))
    classes = sorted((get_method_class(m) for m in method_ids()), key=lambda c: (order.index(taxonomy_of(c.id)), c.id))
    for cls in classes:
        d = cls.describe()
        ident = f"`{cls.id}`" + (f" (alias {', '.join(f'`{a}`' for a in cls.aliases)})" if cls.aliases else "")
        opts = ", ".join(f"`{o['name']}`" for o in describe_options(cls)) or "-"
        where = " / ".join(taxonomy_of(cls.id))
        cells = [ident, where, d["family"], d["paper"], d["weighting"], d["bytes_up"], d["bytes_down"], opts]
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(rows)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main() -> None:
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = _replace(readme.read_text(), BEGIN, END, table())
        text = _replace(text, METHODS_BEGIN, METHODS_END, methods_table())
        readme.write_text(text)
        app = ROOT / "flower" / "pyproject.toml"
        app.write_text(_replace(app.read_text(), FLOWER_BEGIN, FLOWER_END, flower_config()))
    else:
        print(table())
        print()
        print(methods_table())


if __name__ == "__main__":
    main()
