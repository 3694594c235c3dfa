"""Print (or, with --write, refresh in README.md) the tables of every `fedlora run` option and every method."""

from __future__ import annotations

import sys
from pathlib import Path

from fedlora.config import RunConfig

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
METHODS_BEGIN, METHODS_END = "<!-- methods:begin -->", "<!-- methods:end -->"


def table() -> str:
    rows = ["| option (`--flag` / TOML key) | default | meaning |", "|---|---|---|"]
    for name, default, text in RunConfig.help_table():
        flag = "--" + name.replace("_", "-") if name != "method_options" else "--method-option KEY=VALUE"
        rows.append(f"| `{flag}` / `{name}` | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(rows)


def methods_table() -> str:
    """One row per registered method, grouped by family: paper, weighting, bytes up/down per module, options."""
    from fedlora.methods import describe_options, get_method_class, method_ids

    rows = [
        "| id | family | paper | default weighting | up per module | down per module | options |",
        "|---|---|---|---|---|---|---|",
    ]
    classes = sorted((get_method_class(m) for m in method_ids()), key=lambda c: (c.family.split(" (")[0], c.id))
    for cls in classes:
        d = cls.describe()
        ident = f"`{cls.id}`" + (f" (alias {', '.join(f'`{a}`' for a in cls.aliases)})" if cls.aliases else "")
        opts = ", ".join(f"`{o['name']}`" for o in describe_options(cls)) or "-"
        cells = [ident, d["family"], d["paper"], d["weighting"], d["bytes_up"], d["bytes_down"], opts]
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
    else:
        print(table())
        print()
        print(methods_table())


if __name__ == "__main__":
    main()
