"""Registry-wide guarantees: every registered method has an invariant test, typed options, a description."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedlora.methods import describe_options, get_method_class, method_ids

TESTS = Path(__file__).resolve().parent


def _invariant_marks() -> dict[str, list[str]]:
    """``method id -> test functions`` marked ``@pytest.mark.invariant("id")`` anywhere in tests/."""
    found: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            for dec in node.decorator_list:
                call = dec if isinstance(dec, ast.Call) else None
                if call is None or not isinstance(call.func, ast.Attribute) or call.func.attr != "invariant":
                    continue
                for arg in call.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.setdefault(arg.value, []).append(f"{path.name}::{node.name}")
    return found


@pytest.mark.parametrize("method", method_ids())
def test_every_method_has_an_invariant_test(method: str) -> None:
    marks = _invariant_marks()
    assert marks.get(method), (
        f"{method} has no test of its METHODS.md invariant: mark one with @pytest.mark.invariant({method!r})"
    )


def test_invariant_marks_name_registered_methods() -> None:
    unknown = set(_invariant_marks()) - set(method_ids())
    assert not unknown, f"invariant tests for unregistered methods: {sorted(unknown)}"


@pytest.mark.parametrize("method", method_ids())
def test_every_method_describes_itself(method: str) -> None:
    cls = get_method_class(method)
    assert cls.__doc__ or __import__(cls.__module__).__doc__
    module_doc = __import__(cls.__module__, fromlist=["_"]).__doc__ or ""
    assert "arXiv" in module_doc or "Paper" in module_doc, f"{method}: its module docstring must cite the paper"
    d = cls.describe()
    for key in ("family", "paper", "up", "down", "bytes_up", "bytes_down", "weighting"):
        assert d[key], (method, key)
    for opt in describe_options(cls):
        assert opt["help"], f"{method}: option {opt['name']} has no help text"


@pytest.mark.parametrize("method", method_ids())
def test_every_method_has_a_place_in_the_surveys_taxonomy(method: str) -> None:
    from fedlora.methods.taxonomy import AREAS, taxonomy_of

    area, category = taxonomy_of(method)
    assert area in AREAS and category


def test_fedlora_methods_groups_by_area_and_category(capsys) -> None:
    from fedlora.cli import main
    from fedlora.methods.taxonomy import AREAS, TAXONOMY

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    registered = set(method_ids())
    shown = [area for area in AREAS if any(TAXONOMY[m][0] == area for m in registered)]
    positions = [out.index(f"== {area}") for area in shown]
    assert positions == sorted(positions)  # the survey's order
    for m in registered:  # each method listed under its own category, after its area's heading
        line = next(i for i, text in enumerate(out.splitlines()) if text.split()[:1] == [m])
        heading = max(i for i, text in enumerate(out.splitlines()[:line]) if text.startswith("-- "))
        assert out.splitlines()[heading] == f"-- {TAXONOMY[m][1]}", m
