"""The run directory survives kills: atomic files, checksummed checkpoints with fallback to the previous intact
one, retention, torn metrics lines, and race-free reservation of new run directories. No model needed."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

import fedlora.runs as runs
from fedlora.methods.base import ServerState
from fedlora.runs import MARKER, RunDir, RunDirError


def _server(rnd: int) -> ServerState:
    g = torch.Generator().manual_seed(rnd)
    return ServerState(
        round=rnd,
        adapter={"m.lora_A.weight": torch.randn(2, 4, generator=g), "m.lora_B.weight": torch.randn(6, 2, generator=g)},
        tensors={"moment/m": torch.randn(3, generator=g)},
        meta={"clusters": [0, 1], "note": f"round {rnd}"},
        base_delta={"m": torch.randn(6, 4, generator=g)},
        base_version=rnd,
        last_base_update={"m": (torch.randn(6, 1, generator=g), torch.randn(1, 4, generator=g)), "n": torch.ones(2, 2)},
        client_base={0: rnd, 2: max(rnd - 1, 0)},
    )


def _clients(rnd: int) -> dict[int, dict[str, torch.Tensor]]:
    return {
        0: {"local/x": torch.full((2,), float(rnd))},
        2: {"local/x": torch.zeros(2), "y": torch.ones(1, dtype=torch.float16)},
    }


def _weights(rnd: int) -> dict[str, torch.Tensor]:
    return {"m": torch.arange(24, dtype=torch.float32).reshape(6, 4) + rnd}


def _save(rd: RunDir, rnd: int) -> Path:
    return rd.save_checkpoint(_server(rnd), _clients(rnd), _weights(rnd))


def _same_tensors(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple):
            if not all(torch.equal(p, q) for p, q in zip(x, y, strict=True)):
                return False
        elif not (torch.equal(x, y) and x.dtype == y.dtype):
            return False
    return True


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    path = _save(rd, 3)
    assert path == tmp_path / "run" / "checkpoints" / "round-0003"
    assert sorted(p.name for p in path.iterdir()) == ["clients.safetensors", "server.safetensors", "state.json"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    state = json.loads((path / "state.json").read_text())
    assert set(state["files"]) == {"server.safetensors", "clients.safetensors"}
    assert state["files"]["server.safetensors"]["bytes"] == (path / "server.safetensors").stat().st_size

    server, clients, weights = RunDir(tmp_path / "run").load_latest()
    ref = _server(3)
    assert server.round == 3 and server.meta == ref.meta and server.base_version == 3
    assert server.client_base == ref.client_base
    assert _same_tensors(server.adapter, ref.adapter)
    assert _same_tensors(server.tensors, ref.tensors)
    assert _same_tensors(server.base_delta, ref.base_delta)
    assert _same_tensors(server.last_base_update, ref.last_base_update)
    assert clients.keys() == {0, 2}
    for cid, st in _clients(3).items():
        assert _same_tensors(clients[cid], st)
    assert _same_tensors(weights, _weights(3))


def test_load_latest_takes_newest_and_reports_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rd = RunDir(tmp_path)
    assert rd.load_latest() is None and rd.last_loaded is None
    for rnd in (0, 1, 2, 10):
        _save(rd, rnd)
    with caplog.at_level(logging.INFO, logger="fedlora"):
        server, _, _ = rd.load_latest()
    assert server.round == 10 and rd.last_loaded == rd.checkpoint_dir(10)
    assert "resuming from checkpoints/round-0010" in caplog.text


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 20)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum notices
    path.write_bytes(bytes(data))


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def _write_state(ckpt: Path, state: dict) -> None:
    (ckpt / "state.json").write_text(json.dumps(state))


def _legacy_garbage(ckpt: Path) -> None:
    """A checkpoint written before checksums existed, whose tensor file is corrupt: it fails to load."""
    state = _state(ckpt)
    del state["format"], state["files"]
    _write_state(ckpt, state)
    _garbage(ckpt / "server.safetensors")


def _missing_key(ckpt: Path) -> None:
    state = _state(ckpt)
    state["last_base_update"]["ghost"] = "dense"
    _write_state(ckpt, state)


def _wrong_round(ckpt: Path) -> None:
    state = _state(ckpt)
    state["round"] = 7
    _write_state(ckpt, state)


DAMAGE = {
    "truncated server": (lambda c: _truncate(c / "server.safetensors"), "server.safetensors has"),
    "garbage server": (lambda c: _garbage(c / "server.safetensors"), "server.safetensors has"),
    "missing clients": (lambda c: (c / "clients.safetensors").unlink(), "no clients.safetensors"),
    "checksum mismatch": (lambda c: _flip_byte(c / "clients.safetensors"), "clients.safetensors fails its sha256"),
    "garbled state.json": (lambda c: (c / "state.json").write_text('{"round": 2, "fi'), "state.json line 1"),
    "missing state.json": (lambda c: (c / "state.json").unlink(), "incomplete: no state.json"),
    "unloadable legacy": (_legacy_garbage, "server.safetensors cannot be loaded"),
    "missing tensor": (_missing_key, "missing key 'lastbase/ghost'"),
    "wrong round": (_wrong_round, "says round 7"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    rd = RunDir(tmp_path)
    for rnd in (0, 1, 2):
        _save(rd, rnd)
    spoil, reason = DAMAGE[damage]
    spoil(rd.checkpoint_dir(2))
    fresh = RunDir(tmp_path)
    with caplog.at_level(logging.INFO, logger="fedlora"):
        server, clients, weights = fresh.load_latest()
    assert server.round == 1 and fresh.last_loaded == rd.checkpoint_dir(1)
    assert _same_tensors(server.adapter, _server(1).adapter) and _same_tensors(weights, _weights(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("round-0002" in m and reason in m for m in warnings), warnings
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("resuming from checkpoints/round-0001 (round-0002 is damaged: ") for m in info), info
    assert fresh.latest_checkpoint() == rd.checkpoint_dir(1)


def test_no_intact_checkpoint_is_none(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    _save(rd, 0)
    _garbage(rd.checkpoint_dir(0) / "server.safetensors")
    assert rd.load_latest() is None and rd.last_loaded is None


def test_legacy_checkpoint_without_checksums_loads(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    _save(rd, 1)
    state = _state(rd.checkpoint_dir(1))
    del state["format"], state["files"]
    _write_state(rd.checkpoint_dir(1), state)
    server, _, _ = RunDir(tmp_path).load_latest()
    assert server.round == 1


def test_stale_tmp_is_ignored_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rd = RunDir(tmp_path)
    _save(rd, 1)
    _save(rd, 2)
    stale = rd.checkpoints_root / "round-0003.tmp"
    stale.mkdir()
    (stale / "server.safetensors").write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        server, _, _ = rd.load_latest()
    assert server.round == 2
    assert not stale.exists()
    assert "round-0003.tmp" in caplog.text


def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rd = RunDir(tmp_path)
    _save(rd, 1)
    real = runs.save_file
    calls = []

    def dies_after_first_file(tensors, filename, *args, **kw):
        calls.append(filename)
        if len(calls) > 1:
            Path(filename).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(tensors, filename, *args, **kw)

    monkeypatch.setattr(runs, "save_file", dies_after_first_file)
    with pytest.raises(KeyboardInterrupt):
        _save(rd, 2)
    monkeypatch.setattr(runs, "save_file", real)
    assert len(calls) == 2
    assert not rd.checkpoint_dir(2).exists()
    assert not list(rd.checkpoints_root.glob("*.tmp"))  # an exception (unlike a kill) cleans up
    fresh = RunDir(tmp_path)
    server, _, _ = fresh.load_latest()
    assert server.round == 1 and fresh.last_loaded == rd.checkpoint_dir(1)
    assert not list(rd.checkpoints_root.glob("*.tmp"))


def test_resaving_a_round_replaces_it(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    _save(rd, 1)
    _garbage(rd.checkpoint_dir(1) / "server.safetensors")
    _save(rd, 1)
    assert RunDir(tmp_path).load_latest()[0].round == 1


# ---------------------------------------------------------------------------------------------- retention
@pytest.mark.parametrize("keep", [1, 2, 4])
def test_retention_keeps_exactly_n(tmp_path: Path, keep: int) -> None:
    rd = RunDir(tmp_path, keep_checkpoints=keep)
    for rnd in range(6):
        _save(rd, rnd)
        assert len(rd.checkpoints()) == min(rnd + 1, keep)
    assert [p.name for p in rd.checkpoints()] == [f"round-{n:04d}" for n in range(5, 5 - keep, -1)]


def test_retention_none_keeps_all(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    for rnd in range(4):
        _save(rd, rnd)
    assert len(rd.checkpoints()) == 4


def test_retention_counts_only_intact_checkpoints(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    for rnd in range(3):
        _save(rd, rnd)
    _flip_byte(rd.checkpoint_dir(2) / "server.safetensors")
    resumed = RunDir(tmp_path, keep_checkpoints=2)
    assert resumed.load_latest()[0].round == 1
    _save(resumed, 2)  # the damaged round-0002 is replaced
    _save(resumed, 3)
    assert [p.name for p in resumed.checkpoints()] == ["round-0003", "round-0002"]
    _flip_byte(resumed.checkpoint_dir(3) / "clients.safetensors")
    other = RunDir(tmp_path, keep_checkpoints=2)  # knows nothing about which ones are intact
    _save(other, 4)  # the damaged round-0003 does not count: round-0002 is kept, round-0003 deleted
    assert [p.name for p in other.checkpoints()] == ["round-0004", "round-0002"]


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_retention_rejects_bad_counts(tmp_path: Path, bad) -> None:
    with pytest.raises(RunDirError, match="keep_checkpoints"):
        RunDir(tmp_path, keep_checkpoints=bad)
    rd = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="keep_checkpoints"):
        rd.keep_checkpoints = bad


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_round_trip_and_truncate(tmp_path: Path) -> None:
    rd = RunDir.reserve(tmp_path, "r", "x")
    for k in (1, 2, 3):
        rd.append_metrics({"round": k, "train_loss": 1.0 / k})
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]
    rd.truncate_metrics(2)  # 1-based: the checkpoint after round 2 keeps rounds 1 and 2
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]
    rd.truncate_metrics(0)
    assert rd.read_metrics() == []


def test_torn_last_metrics_line_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rd = RunDir(tmp_path)
    rd.append_metrics({"round": 1})
    rd.append_metrics({"round": 2})
    with rd.metrics_path.open("a") as f:
        f.write('{"round": 3, "train_lo')
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        assert rd.read_metrics() == [{"round": 1}, {"round": 2}]
    assert "line 3" in caplog.text
    rd.append_metrics({"round": 3})  # the torn line is dropped, not glued to the new record
    assert rd.read_metrics() == [{"round": 1}, {"round": 2}, {"round": 3}]
    rd.truncate_metrics(2)
    assert rd.metrics_path.read_text() == '{"round": 1}\n{"round": 2}\n'


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text('{"round": 1}\n{"round": 2}')
    rd.append_metrics({"round": 3})
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]


def test_bad_middle_metrics_line_is_an_error(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text('{"round": 1}\n\nnot json\n{"round": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl line 3"):
        rd.read_metrics()


def test_truncate_needs_round_numbers(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.metrics_path.write_text('{"round": 1}\n{"loss": 2}\n')
    with pytest.raises(RunDirError, match="record 2 has no integer 'round'"):
        rd.truncate_metrics(1)


def test_plot_uses_one_based_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    xs = []
    real = Axes.plot

    def spy(self, x, *args, **kw):
        xs.append(list(x))
        return real(self, x, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    rd = RunDir(tmp_path)
    for k in (1, 2, 3):
        rd.append_metrics({"round": k, "train_loss": 1.0 / k, "global_accuracy": 0.5})
    out = rd.plot()
    assert out == tmp_path / "metrics.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert xs and all(x == [1, 2, 3] for x in xs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]


def test_plot_starts_at_round_zero_with_an_initial_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.plot

    def spy(self, x, y, *args, **kw):
        drawn.append((kw.get("label"), list(x), list(y)))
        return real(self, x, y, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    rd = RunDir(tmp_path)
    rd.write_initial({"global_accuracy": 0.125, "global_loss": 2.5})
    assert rd.read_initial() == {"global_accuracy": 0.125, "global_loss": 2.5}
    for k in (1, 2):
        rd.append_metrics({"round": k, "train_loss": 1.0 / k, "global_accuracy": 0.5, "global_loss": 1.0})
    rd.plot()
    by_label = {label: (x, y) for label, x, y in drawn}
    assert by_label["global (held-out)"][0] == [0, 1, 2]
    assert [y for _, _, y in drawn if y[0] == 0.125] == [[0.125, 0.5, 0.5]]
    assert any(y == [2.5, 1.0, 1.0] for _, _, y in drawn)
    assert by_label["train"][1][0] is None  # no training before round 1
    rd.initial_path.write_text("{not json")
    assert rd.read_initial() == {}  # informative only: a damaged file is ignored


# ---------------------------------------------------------------------------------------------- atomic files
def test_files_are_replaced_atomically(tmp_path: Path) -> None:
    rd = RunDir.reserve(tmp_path, "r", "x")
    rd.write_config({"a": 1})
    rd.write_data_info({"labels": ["x"]})
    rd.append_metrics({"round": 1})
    rd.write_summary({"final": {"acc": 0.5}})
    rd.save_base_delta({"m": torch.ones(2, 2)})
    assert sorted(p.name for p in rd.path.iterdir()) == [
        MARKER,
        "base_delta.safetensors",
        "config.json",
        "data.json",
        "metrics.jsonl",
        "summary.json",
    ]
    assert rd.read_config() == {"a": 1}

    def dies(path: Path) -> None:
        path.write_text('{"trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runs._atomic_write(rd.config_path, dies)
    assert rd.read_config() == {"a": 1}  # the old file is untouched, no temp file is left behind
    assert not [p for p in rd.path.iterdir() if p.name.endswith(".tmp")]


def test_read_config_errors(tmp_path: Path) -> None:
    rd = RunDir.reserve(tmp_path, "r", "stem")
    with pytest.raises(RunDirError, match="stopped before it started"):
        rd.read_config()
    rd.config_path.write_text('{"a": 1,\n oops}')
    with pytest.raises(RunDirError, match=r"config\.json line 2"):
        rd.read_config()
    with pytest.raises(RunDirError, match="no config.json"):
        RunDir(tmp_path / "nothing").read_config()


# ---------------------------------------------------------------------------------------------- reservation
def test_reserve_named_run(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    rd = RunDir.reserve(out, "my-run", "stem", keep_checkpoints=2)
    assert rd.path == out / "my-run" and rd.keep_checkpoints == 2
    marker = json.loads((rd.path / MARKER).read_text())
    assert marker["format"] == runs.RUN_FORMAT and marker["pid"] == os.getpid() and marker["created"]
    assert sorted(p.name for p in out.iterdir()) == ["my-run"]  # no probe file left behind


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", "", "-x", "a\\b", "a\0b", "/abs"])
def test_reserve_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(RunDirError, match="plain directory name inside out_dir"):
        RunDir.reserve(tmp_path / "out", name, "stem")
    assert not (tmp_path / "x").exists() and not (tmp_path / "out" / "a").exists()


def test_reserve_refuses_bad_stem(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="plain directory name"):
        RunDir.reserve(tmp_path, None, "../up")


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        RunDir.check_out_dir(f)
    with pytest.raises(RunDirError, match="is a file"):
        RunDir.reserve(f, "r", "stem")
    with pytest.raises(RunDirError, match="a part of its path is a file"):
        RunDir.check_out_dir(f / "sub")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            RunDir.check_out_dir(out)
    finally:
        out.chmod(0o700)


def test_unwritable_out_dir_is_refused_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runs.tempfile, "mkstemp", denied)
    with pytest.raises(RunDirError, match="is not writable: Permission denied"):
        RunDir.reserve(tmp_path, None, "stem")
    assert list(tmp_path.iterdir()) == []


def test_unnamed_runs_get_distinct_dirs_under_a_race(tmp_path: Path) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(RunDir.reserve(tmp_path, None, "20240101-000000-fedit").path)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == n
    expected = {"20240101-000000-fedit"} | {f"20240101-000000-fedit-{k}" for k in range(2, n + 1)}
    assert {p.name for p in results} == expected
    assert all((p / MARKER).is_file() for p in results)


def test_existing_non_run_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(RunDirError, match="exists and is not a fedlora run directory; refusing to write into it"):
        RunDir.reserve(tmp_path, "photos", "stem")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["a.jpg"]
    (tmp_path / "plainfile").write_text("x")
    with pytest.raises(RunDirError, match="is not a fedlora run directory"):
        RunDir.reserve(tmp_path, "plainfile", "stem")


def test_existing_run_is_refused_with_resume_hint(tmp_path: Path) -> None:
    RunDir.reserve(tmp_path, "r1", "stem")
    with pytest.raises(RunDirError, match="already holds a run; pick another run_name or use --resume"):
        RunDir.reserve(tmp_path, "r1", "stem")
    old = tmp_path / "old"  # a run from before the marker existed
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(RunDirError, match="already holds a run"):
        RunDir.reserve(tmp_path, "old", "stem")


def test_open_existing(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir.open_existing(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        RunDir.open_existing(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a fedlora run directory"):
        RunDir.open_existing(tmp_path / "empty")
    rd = RunDir.reserve(tmp_path, "r", "stem")
    opened = RunDir.open_existing(rd.path, keep_checkpoints=3)
    assert opened.path == rd.path and opened.keep_checkpoints == 3


def test_write_config_and_data_info_replace_files(tmp_path: Path) -> None:
    rd = RunDir.reserve(tmp_path, "r", "stem")
    rd.write_config({"rounds": 3})
    rd.write_data_info({"labels": ["a"]})
    rd.write_config({"rounds": 5})
    assert rd.read_config() == {"rounds": 5}
    assert json.loads((rd.path / "data.json").read_text()) == {"labels": ["a"]}
    assert sorted(p.name for p in rd.path.iterdir()) == [MARKER, "config.json", "data.json"]
