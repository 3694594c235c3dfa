"""Configuration validation, files and flags, and the command line."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main
from fedlora.config import ConfigError, RunConfig


def test_defaults_are_valid_and_resolve() -> None:
    from fedlora.api import resolve_config

    cfg = resolve_config(RunConfig())
    assert cfg.method == "fedit" and cfg.clients >= 8 and cfg.partition.startswith("dirichlet")
    assert cfg.labels and len(cfg.labels) == 8 and cfg.weighting == "num_examples"
    assert resolve_config(RunConfig(method="fedex_lora")).weighting == "uniform"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"methd": "fedit"}, "unknown config key 'methd' \\(did you mean 'method'\\?\\); allowed keys: method"),
        ({"method": "fedavg2"}, "method='fedavg2' is not allowed; allowed values: .*fedit.*fedavg_lora"),
        ({"optimizer": "adam"}, "optimizer='adam' is not allowed; allowed values: adamw, sgd"),
        ({"rounds": 0}, "rounds=0 must be >= 1"),
        ({"rounds": "many"}, "rounds='many' is not a valid int"),
        ({"lora_dropout": 1.5}, "lora_dropout=1.5 must be <= 1.0"),
        ({"partition": "dirichlet"}, "partition:"),
        ({"partition": "shards:3"}, "partition:"),
        ({"clients": 4, "clients_per_round": 6}, "clients_per_round=6 exceeds clients=4"),
        ({"clients_per_round": 2, "client_fraction": 0.5}, "either clients_per_round or client_fraction"),
        ({"method": "fedit", "method_options": {"local_head": False}}, "'local_head' is not an option of fedit"),
        ({"progress": "maybe"}, "progress='maybe' is not a valid bool"),
        ({"alpha_rule": "linear"}, "alpha_rule='linear' is not allowed; allowed values: auto, constant, proportional"),
        ({"method": "fedsa_lora", "method_options": {"local_head": "nope"}}, "local_head='nope' is not a boolean"),
        ({"method": "fedsa_lora", "method_options": {"local_hed": True}}, "'local_hed' is not an option of fedsa_lora"),
        (
            {"client_ranks": "2,4,8"},
            "fedit trains one rank for all clients; mixed ranks need one of: .*flexlora, flora,",
        ),
        ({"method": "flora", "client_ranks": "2,16"}, "rank 16 exceeds lora_r=8"),
        ({"method": "fedadam", "client_ranks": "4"}, "fedadam trains every client at the global rank; set --lora-r 4"),
        ({"method": "flora", "client_ranks": "list:2,4", "clients": 3}, "2 ranks for 3 clients"),
        ({"method": "flora", "client_ranks": "cyclic:2,4"}, "unknown form 'cyclic'"),
        ({"upload_codec": "topk:1.5"}, "upload_codec: codec 'topk:1.5': the top-k density must be a number in"),
        ({"download_codec": "zip"}, "download_codec: unknown codec 'zip'; allowed: none, fp16, int8, topk"),
        ({"labels": [1, 2]}, "labels must be a list of strings"),
    ],
)
def test_bad_values_fail_fast_naming_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(values)


def test_strings_are_parsed_like_flags() -> None:
    cfg = RunConfig.from_dict(
        {"rounds": "3", "lr": "1e-4", "progress": "false", "labels": "a,b", "clients-per-round": "none"}
    )
    assert (cfg.rounds, cfg.lr, cfg.progress, cfg.labels, cfg.clients_per_round) == (3, 1e-4, False, ["a", "b"], None)
    assert RunConfig.from_dict({"method": "fedsa_lora", "method_options": {"local_head": False}}).method_options == {
        "local_head": False
    }


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "off"])
def test_method_option_false_strings_are_false(text: str) -> None:
    from fedlora.methods import get_method_class, parse_options

    assert parse_options(get_method_class("fedsa_lora"), {"local_head": text}).local_head is False


def test_client_ranks_forms() -> None:
    from fedlora.config import parse_client_ranks

    assert parse_client_ranks("2,4,8", 5, 0) == [2, 4, 8, 2, 4]
    assert parse_client_ranks("tiers:2,4", 3, 0) == [2, 4, 2]
    assert parse_client_ranks("list:8,2,4", 3, 0) == [8, 2, 4]
    drawn = parse_client_ranks("random:2,4,8", 50, 1)
    assert drawn == parse_client_ranks("random:2,4,8", 50, 1) and set(drawn) == {2, 4, 8}
    assert drawn != parse_client_ranks("random:2,4,8", 50, 2)


def test_config_file_and_flag_override(tmp_path) -> None:
    from fedlora.cli import config_from_args

    toml = tmp_path / "exp.toml"
    toml.write_text('method = "flexlora"\nrounds = 7\nlora-r = 4\n[method_options]\n')
    import argparse

    ns = argparse.Namespace(config=str(toml), method_option=[], **{n: None for n, _, _ in RunConfig.help_table()})
    ns.rounds = "2"
    cfg = config_from_args(ns)
    assert (cfg.method, cfg.rounds, cfg.lora_r) == ("flexlora", 2, 4)
    bad = tmp_path / "bad.toml"
    bad.write_text("rouds = 3\n")
    with pytest.raises(ConfigError, match="rouds"):
        RunConfig.from_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_file(tmp_path / "missing.toml")


def test_cli_methods_lists_every_method(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in ["fedit", "ffa_lora", "fedex_lora", "flora", "flexlora", "fedsa_lora", "rolora"]:
        assert f"\n{m} " in out
    assert "arXiv:2410.09432" in out and "UP" in out and "DOWN" in out


def test_cli_method_detail_and_typed_method_options(capsys) -> None:
    from fedlora.cli import _add_run_parser, config_from_args

    assert main(["methods", "fedsa_lora"]) == 0
    out = capsys.readouterr().out
    assert "local_head (bool, default True)" in out and "arXiv:2410.01463" in out
    assert "gate" not in out.split("options")[0]
    assert main(["methods", "fedalt"]) == 0
    assert "gate        a trained token-wise softmax over row, default" in capsys.readouterr().out
    assert main(["methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    import argparse

    parser = argparse.ArgumentParser()
    _add_run_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run", "--method", "fedsa_lora", "--method-option", "local_head=False"])
    assert config_from_args(args).method_options == {"local_head": "False"}
    from fedlora.api import resolve_config

    assert resolve_config(config_from_args(args)).method_options == {"local_head": False}
    assert main(["run", "--method", "fedsa_lora", "--method-option", "local_head=perhaps"]) == 2
    assert "local_head='perhaps' is not a boolean; allowed: true, false" in capsys.readouterr().err
    assert main(["run", "--method", "fedsa_lora", "--method-option", "head=true"]) == 2
    assert "'head' is not an option of fedsa_lora; allowed: local_head" in capsys.readouterr().err
    assert resolve_config(RunConfig(method="fedavg_lora")).method == "fedit"  # the documented alias
    # alpha_rule=auto: factor-averaging methods of mixed ranks prefer one scale for every rank
    assert resolve_config(RunConfig(method="hetlora", client_ranks="2,4")).alpha_rule == "proportional"
    assert resolve_config(RunConfig(method="flora", client_ranks="2,4")).alpha_rule == "constant"
    assert resolve_config(RunConfig(method="hetlora", alpha_rule="rslora")).alpha_rule == "rslora"


def test_cli_rejects_bad_input_before_any_work(capsys, tmp_path) -> None:
    assert main(["run", "--partition", "dirichlet:-1", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "partition" in err and "alpha" in err.lower()
    assert not any(tmp_path.iterdir())  # nothing was written
    assert main(["run", "--optimizer", "rmsprop"]) == 2
    assert "allowed values: adamw, sgd" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--dataset", str(tmp_path / "missing.csv"), "--out-dir", str(tmp_path)]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_cli_runs_and_resumes(tiny_bert: str, tmp_path, capsys) -> None:
    from helpers import tiny_cli_args

    args = tiny_cli_args(tiny_bert, tmp_path, "--run-name", "r")
    assert main(args) == 0
    assert "global_accuracy=" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["rounds"] == 1 and cfg["model"] == tiny_bert
    assert main(["run", "--resume", str(tmp_path / "r"), "--rounds", "2", "--progress", "false"]) == 0
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    assert main(["run", "--resume", str(tmp_path / "r"), "--lr", "0.1"]) == 2
    assert "cannot change ['lr']" in capsys.readouterr().err
    assert main(args) == 2  # the run directory exists already
    assert "already holds a run" in capsys.readouterr().err


def test_readme_documents_every_option_and_opens_with_two_commands() -> None:
    from pathlib import Path

    import options_table  # scripts/options_table.py

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert options_table.table() in readme, "README options table is stale: run scripts/options_table.py --write"
    assert options_table.methods_table() in readme, (
        "README methods table is stale: run scripts/options_table.py --write"
    )
    blocks = readme.split("```bash\n")[1:3]
    commands = [b.split("\n```", 1)[0].strip() for b in blocks]
    assert commands == [
        "bash scripts/install.sh && .venv/bin/fedlora run",
        "bash scripts/install.sh --dev && .venv/bin/python -m pytest -n 2 --dist loadfile",
    ]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert commands[1] in ci
