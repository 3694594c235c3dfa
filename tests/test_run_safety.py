"""Bad run inputs fail early and clearly; runs never end 'done' without having learnt anything; resume works from
anywhere, also for a run killed before its first checkpoint; checkpoints are bounded; client failures are a setting."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
from helpers import tiny_cli_args as _tiny_args
from helpers import tiny_config
from safetensors.torch import load_file

from fedlora import RunConfig, run
from fedlora.api import resume
from fedlora.cli import main
from fedlora.config import ConfigError

FLOAT_OPTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.metadata["kind"] is float]


@pytest.mark.parametrize("name", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_every_numeric_option_rejects_nan_and_inf(name: str, value) -> None:
    with pytest.raises(ConfigError, match=f"{name}=.*(finite|must be)"):
        RunConfig.from_dict({name: value})


@pytest.mark.parametrize("value", ["maybe", "2", "False!"])
def test_boolean_options_parse_strictly(value: str) -> None:
    with pytest.raises(ConfigError, match="progress"):
        RunConfig.from_dict({"progress": value})


def test_output_location_is_checked_before_anything_is_loaded(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the model does not exist either: the output problem must be reported first, before any loading
    assert main(_tiny_args(str(tmp_path / "no-model"), blocker)) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "no-model" not in err


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "."])
def test_run_name_cannot_leave_the_output_directory(name: str, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_tiny_args(str(tmp_path / "no-model"), out, "--run-name", name)) == 2
    assert "run_name" in capsys.readouterr().err or "name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_run_that_accepts_no_reply_exits_non_zero_with_the_reasons(tiny_bert, tmp_path, capsys, monkeypatch) -> None:
    import fedlora.engines.local as local

    def broken(*a, **k):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(local, "client_round", broken)
    assert main(_tiny_args(tiny_bert, tmp_path, "--rounds", "5", "--max-failed-rounds", "2")) == 1
    err = capsys.readouterr().err
    assert "2 rounds in a row" in err and "device-side assert" in err
    run_dir = next(tmp_path.iterdir())
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_works_from_any_directory_and_cannot_shrink_a_run(tiny_bert, tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_bert, work / "model")
    monkeypatch.chdir(work)
    assert main(_tiny_args("model", "runs", "--run-name", "r", "--rounds", "2")) == 0
    cfg = json.loads((work / "runs" / "r" / "config.json").read_text())
    assert cfg["model"] == str(work / "model") and cfg["out_dir"] == str(work / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--resume", str(work / "runs" / "r"), "--rounds", "3", "--progress", "false"]) == 0
    assert json.loads((work / "runs" / "r" / "config.json").read_text())["rounds"] == 3  # extended for good
    capsys.readouterr()
    assert main(["run", "--resume", str(work / "runs" / "r"), "--rounds", "1", "--progress", "false"]) == 2
    assert "completed 3 rounds" in capsys.readouterr().err


def test_a_run_killed_before_its_first_checkpoint_resumes_to_the_same_result(tiny_bert, tmp_path) -> None:
    cfg = tiny_config(tiny_bert, tmp_path, rounds=2, run_name="whole", keep_checkpoints=1)
    whole = run(cfg)
    assert sorted(p.name for p in (whole.run_dir / "checkpoints").iterdir()) == ["round-0002"]  # retention
    cut = tmp_path / "cut"
    shutil.copytree(whole.run_dir, cut)
    for name in ("checkpoints", "adapter", "summary.json", "metrics.png"):
        p = cut / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (cut / "metrics.jsonl").write_text('{"round": 1, "accepted": 4}\n{"round": 2, "acc')  # torn
    again = resume(cut)
    a = load_file(str(whole.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(again.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert [r["round"] for r in again.history] == [1, 2]


def test_clients_failing_mid_round_and_stragglers_do_not_stop_a_run(tiny_bert, tmp_path) -> None:
    cfg = tiny_config(
        tiny_bert, tmp_path, rounds=8, local_epochs=1, client_dropout=0.3, stragglers=0.3, run_name="flaky"
    )
    result = run(cfg)
    rejected = [why for r in result.history for why in r["rejected"].values()]
    dropped = [why for why in rejected if "dropped out after" in why]
    assert len(dropped) >= 4, rejected  # ~30% of 32 client turns
    # besides the simulated failures, only the direction check may reject (logged) an honest update
    assert all("dropped out after" in why or "points away" in why for why in rejected), rejected
    assert result.final["global_accuracy"] > 0.25, result.final
    assert os.path.isfile(result.run_dir / "adapter" / "adapter_model.safetensors")


def test_a_run_that_fails_on_bad_input_leaves_no_directory_and_its_name_free(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(_tiny_args(str(tmp_path / "no-model"), out, "--run-name", "r")) == 2
    assert "no-model" in capsys.readouterr().err
    assert not (out / "r").exists()
