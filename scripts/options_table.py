"""Print (or, with --write, refresh in README.md) the table of every `fedlora run` option."""

from __future__ import annotations

import sys
from pathlib import Path

from fedlora.config import RunConfig

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def table() -> str:
    rows = ["| option (`--flag` / TOML key) | default | meaning |", "|---|---|---|"]
    for name, default, text in RunConfig.help_table():
        flag = "--" + name.replace("_", "-") if name != "method_options" else "--method-option KEY=VALUE"
        rows.append(f"| `{flag}` / `{name}` | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> None:
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = readme.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    else:
        print(table())


if __name__ == "__main__":
    main()
