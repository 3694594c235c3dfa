"""The run directory: resolved config, ``metrics.jsonl``, per-round checkpoints, final adapters and plots.

Layout::

    RUN_DIR/.fedlora-run            marker (JSON: format, created, pid), written right after the directory is made
    RUN_DIR/config.json             the resolved configuration (what ``--resume`` reloads)
    RUN_DIR/data.json               labels and per-client label counts
    RUN_DIR/metrics.jsonl           one JSON line per round, ``"round": k`` for the k-th round (1-based)
    RUN_DIR/checkpoints/round-NNNN/ server.safetensors, clients.safetensors, state.json: the state after NNNN
                                    completed rounds (round-0000: before any training)
    RUN_DIR/adapter/                the final global adapter (peft ``save_pretrained``)
    RUN_DIR/base_delta.safetensors  the change of the frozen base weights (FedEx-LoRA, FLoRA), if any
    RUN_DIR/personal/client-K/      personal adapters (FedSA-LoRA), peft format
    RUN_DIR/metrics.png             the task's scores (e.g. accuracy) and losses per round
    RUN_DIR/summary.json            final metrics

Tensors are stored with safetensors, everything else as JSON; nothing is pickled.

Crash safety: every file is written to a temporary file in the same directory, fsync'd and renamed into place
(then the directory is fsync'd), so a kill leaves either the old or the new version. ``metrics.jsonl`` is
appended to (one fsync'd line per round); a line torn by a kill during an append is ignored (and dropped by the
next append). A checkpoint is written into ``round-NNNN.tmp/``, with ``state.json`` last holding the sha256 and
size of each tensor file, then renamed to ``round-NNNN/``. :meth:`RunDir.load_latest` takes the newest checkpoint
that is complete and passes its checksums, skipping (and logging) damaged ones. With ``keep_checkpoints=N`` only
the newest N intact checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedlora.methods.base import ServerState

log = logging.getLogger("fedlora")

MARKER = ".fedlora-run"
"""The file that makes a directory recognisable as a fedlora run directory."""
RUN_FORMAT = 1
"""Version of the run-directory layout (written into the marker)."""
CHECKPOINT_FORMAT = 1
"""Version of ``state.json`` in a checkpoint (checkpoints without it predate checksums)."""
TENSOR_FILES = ("server.safetensors", "clients.safetensors")

_CHECKPOINT_RE = re.compile(r"round-(\d{4,})")
_HASH_CHUNK = 1 << 20
_MAX_NAME_TRIES = 10_000

Checkpoint = tuple[ServerState, dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""``(server state, per-client states, base weights)``."""


class RunDirError(ValueError):
    """A run directory is missing, incomplete, damaged or not resumable, or cannot be created."""


# ---------------------------------------------------------------------------------------------- durable writes
def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be fsync'd)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes | str | Callable[[Path], None]) -> dict[str, Any]:
    """Write ``data`` (bytes, text, or a function that writes the file at the path it is given) to ``path`` and
    fsync it; returns the file's ``{"sha256": ..., "bytes": ...}``."""
    if callable(data):
        data(path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return {"sha256": _file_digest(path), "bytes": path.stat().st_size}
    raw = data.encode() if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


def _atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> dict[str, Any]:
    """Replace ``path`` atomically: write a temp file next to it, fsync it, rename it over ``path``, fsync the
    directory. A kill at any point leaves the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        info = _write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return info


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _tensor_writer(tensors: Mapping[str, torch.Tensor]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))

    return write


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_keys(path: Path) -> set[str]:
    """The tensor names in a safetensors file's header (validates the header; loads no tensor)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise RunDirError(f"{path.name} cannot be loaded: {e}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunDirError(f"{path.name} cannot be loaded: {e}") from None


def _check_state(state: dict[str, Any], server_keys: set[str], client_keys: set[str]) -> None:
    """``state.json`` of a checkpoint has every field in the right type, and names only tensors that exist."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(state.get("round")):
        raise RunDirError(f"state.json: 'round' is {state.get('round')!r}, not an integer")
    if not isinstance(state.get("meta", {}), dict):
        raise RunDirError("state.json: 'meta' is not a JSON object")
    if not is_int(state.get("base_version", 0)):
        raise RunDirError(f"state.json: 'base_version' is {state.get('base_version')!r}, not an integer")
    client_base = state.get("client_base", {})
    if not isinstance(client_base, dict) or not all(k.isdigit() and is_int(v) for k, v in client_base.items()):
        raise RunDirError("state.json: 'client_base' is not a map of client ids to integers")
    last = state.get("last_base_update", {})
    if not isinstance(last, dict):
        raise RunDirError("state.json: 'last_base_update' is not a JSON object")
    for name, kind in last.items():
        if kind == "factored":
            needed = [f"lastbase/{name}/B", f"lastbase/{name}/A"]
        elif kind == "dense":
            needed = [f"lastbase/{name}"]
        else:
            raise RunDirError(f"state.json: last_base_update[{name!r}] is {kind!r}, not 'factored' or 'dense'")
        for key in needed:
            if key not in server_keys:
                raise RunDirError(f"missing key {key!r}: state.json names it, server.safetensors lacks it")
    for key in client_keys:
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] != "client" or not parts[1].isdigit() or not parts[2]:
            raise RunDirError(f"clients.safetensors holds {key!r}, not 'client/<id>/<name>'")


# ---------------------------------------------------------------------------------------------- names
def _check_name(name: str, out_dir: Path, what: str = "run_name") -> None:
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or name.startswith("-")
        or "\0" in name
        or "/" in name
        or "\\" in name
        or (os.altsep is not None and os.altsep in name)
    )
    if bad:
        raise RunDirError(
            f"{what}={name!r} is not allowed: it must be a plain directory name inside out_dir {str(out_dir)!r} "
            "(no '/', '\\', NUL; not '.', '..', empty, or starting with '-')"
        )


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / MARKER).is_file() or (path / "config.json").is_file())


def _checkpoint_number(path: Path) -> int | None:
    m = _CHECKPOINT_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


class RunDir:
    """A run directory (see the module docstring for its layout); implements the run loop's ``Store``.

    ``keep_checkpoints``: keep only the newest N intact checkpoints after each save (None: keep all).
    ``last_loaded``: the checkpoint :meth:`load_latest` used last (None: none yet, or none intact).
    """

    def __init__(self, path: str | os.PathLike[str], keep_checkpoints: int | None = None) -> None:
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints
        self.last_loaded: Path | None = None
        self._intact: set[str] = set()  # checkpoint names verified (written or checked) by this object

    @property
    def keep_checkpoints(self) -> int | None:
        return self._keep

    @keep_checkpoints.setter
    def keep_checkpoints(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RunDirError(f"keep_checkpoints={value!r} must be an integer >= 1, or None to keep all")
        self._keep = value

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def marker_path(self) -> Path:
        return self.path / MARKER

    @property
    def run_id(self) -> str:
        """A key of this run that no other run shares, kept when it is resumed (even under another path): the id in
        its marker (for a run directory made before ids existed: its name and creation time)."""
        try:
            marker = json.loads(self.marker_path.read_text())
        except (OSError, ValueError):
            marker = {}
        if not isinstance(marker, dict):
            marker = {}
        return str(marker.get("id") or f"{self.path.name}@{marker.get('created', '')}")

    # ------------------------------------------------------------------ creating and opening
    @staticmethod
    def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
        """Make sure ``out_dir`` is a writable directory (created with its parents if missing); returns it."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise RunDirError(f"out_dir {str(out)!r} is a file, not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunDirError(f"out_dir {str(out)!r} cannot be created: a part of its path is a file") from None
        except OSError as e:
            raise RunDirError(f"out_dir {str(out)!r} cannot be created: {e.strerror or e}") from None
        try:
            fd, probe = tempfile.mkstemp(prefix=".fedlora-write-test-", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RunDirError(f"out_dir {str(out)!r} is not writable: {e.strerror or e}") from None
        return out

    @classmethod
    def reserve(
        cls,
        out_dir: str | os.PathLike[str],
        name: str | None,
        stem: str,
        *,
        keep_checkpoints: int | None = None,
    ) -> RunDir:
        """Create a new run directory inside ``out_dir`` atomically and mark it as a fedlora run.

        ``name``: the directory's name (an existing directory is refused). ``None``: the first free one of
        ``stem``, ``stem-2``, ``stem-3``, ... (concurrent callers get different directories).
        """
        out = cls.check_out_dir(out_dir)
        if name is not None:
            _check_name(name, out)
            path = out / name
            try:
                os.mkdir(path)
            except FileExistsError:
                if _is_run_dir(path):
                    raise RunDirError(
                        f"{path} already holds a run; pick another run_name or use --resume {path}"
                    ) from None
                raise RunDirError(
                    f"{path} exists and is not a fedlora run directory; refusing to write into it"
                ) from None
            except OSError as e:
                raise RunDirError(f"cannot create run directory {path}: {e.strerror or e}") from None
        else:
            _check_name(stem, out, what="run directory stem")
            for n in range(1, _MAX_NAME_TRIES + 1):
                path = out / (stem if n == 1 else f"{stem}-{n}")
                try:
                    os.mkdir(path)
                    break
                except FileExistsError:
                    continue
                except OSError as e:
                    raise RunDirError(f"cannot create run directory {path}: {e.strerror or e}") from None
            else:
                raise RunDirError(f"{out} already holds {_MAX_NAME_TRIES} run directories named {stem}[-N]")
        marker = {
            "format": RUN_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "id": uuid.uuid4().hex,
        }
        try:
            _atomic_write(path / MARKER, _json_text(marker))
        except OSError as e:
            shutil.rmtree(path, ignore_errors=True)
            raise RunDirError(f"cannot write {path / MARKER}: {e.strerror or e}") from None
        _fsync_dir(out)
        return cls(path, keep_checkpoints=keep_checkpoints)

    @classmethod
    def open_existing(cls, path: str | os.PathLike[str], *, keep_checkpoints: int | None = None) -> RunDir:
        """An existing run directory (for resume); RunDirError when it is missing or not a fedlora run."""
        p = Path(path)
        if not p.exists():
            raise RunDirError(f"run directory {str(p)!r} does not exist")
        if not p.is_dir():
            raise RunDirError(f"{str(p)!r} is a file, not a run directory")
        if not _is_run_dir(p):
            raise RunDirError(f"{str(p)!r} is not a fedlora run directory (no {MARKER} marker and no config.json)")
        return cls(p, keep_checkpoints=keep_checkpoints)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write (or replace, atomically) ``config.json``, the resolved configuration ``--resume`` reloads."""
        _atomic_write(self.config_path, _json_text(config))

    def write_data_info(self, data_info: Mapping[str, Any]) -> None:
        """Write (or replace, atomically) ``data.json``: labels and per-client label counts."""
        _atomic_write(self.path / "data.json", _json_text(data_info))

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            if self.marker_path.is_file():
                raise RunDirError(
                    f"{self.path} has no config.json: the run was stopped before it started; start a new run"
                )
            raise RunDirError(f"{self.path} is not a fedlora run directory (no config.json)")
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise RunDirError(f"cannot read {self.config_path}: {e}") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.config_path} line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config_path} must hold a JSON object, not {type(config).__name__}")
        return config

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line and fsync it (a line torn by an earlier kill is dropped first)."""
        line = (json.dumps(record) + "\n").encode()
        with open(self.metrics_path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    self._repair_tail(f, size)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _repair_tail(self, f: Any, size: int) -> None:
        """The file does not end with a newline: keep its last line if it is a complete record, else cut it."""
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:].decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning(
                "%s: dropping a torn last line (%d bytes) left by an interrupted write", self.metrics_path, size - start
            )
            f.truncate(start)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-round records. An unparsable last line (torn by a kill) is ignored with a warning; an
        unparsable line elsewhere is a RunDirError naming its line number."""
        if not self.metrics_path.is_file():
            return []
        try:
            text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise RunDirError(f"cannot read {self.metrics_path}: {e.strerror or e}") from None
        lines = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
        records = []
        for pos, (lineno, line) in enumerate(lines):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as e:
                if pos == len(lines) - 1:
                    log.warning("%s line %d: ignoring a torn last line (%s)", self.metrics_path, lineno, e)
                    break
                raise RunDirError(f"{self.metrics_path} line {lineno}: not a JSON record ({e})") from None
            records.append(record)
        return records

    def truncate_metrics(self, rounds_done: int) -> None:
        """Keep the records of rounds ``1..rounds_done`` (drop those written after the last checkpoint)."""
        kept = []
        for i, r in enumerate(self.read_metrics(), start=1):
            rnd = r.get("round")
            if isinstance(rnd, bool) or not isinstance(rnd, int):
                raise RunDirError(f"{self.metrics_path}: record {i} has no integer 'round' (got {rnd!r})")
            if rnd <= rounds_done:
                kept.append(r)
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoints_root(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_dir(self, rounds_done: int) -> Path:
        return self.checkpoints_root / f"round-{rounds_done:04d}"

    def checkpoints(self) -> list[Path]:
        """Every ``round-NNNN`` directory (intact or not), newest first."""
        root = self.checkpoints_root
        if not root.is_dir():
            return []
        found = [(n, p) for p in root.iterdir() if (n := _checkpoint_number(p)) is not None and p.is_dir()]
        return [p for _, p in sorted(found, reverse=True)]

    def save_checkpoint(
        self,
        server: ServerState,
        clients: Mapping[int, Mapping[str, torch.Tensor]],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the state after ``server.round`` completed rounds, atomically (temp dir, then rename).

        Generic for every method: the server's adapter, named tensors and JSON metadata, each client's kept
        tensors, the base-weight bookkeeping, and ``weights`` (the current frozen weights of the adapted modules
        when a method changes them: a resumed run restores them bit for bit; re-adding the cumulative delta would
        round differently). Every file is fsync'd; ``state.json`` (with each tensor file's sha256 and size) is
        written last. Afterwards all but the newest ``keep_checkpoints`` intact checkpoints are deleted.
        """
        root = self.checkpoints_root
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.path)
        final = self.checkpoint_dir(server.round)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {f"adapter/{k}": v for k, v in server.adapter.items()}
        tensors.update({f"state/{k}": v for k, v in server.tensors.items()})
        tensors.update({f"base/{k}": v for k, v in server.base_delta.items()})
        last_kinds = {}
        for name, d in server.last_base_update.items():
            if isinstance(d, tuple):
                tensors[f"lastbase/{name}/B"], tensors[f"lastbase/{name}/A"] = d
                last_kinds[name] = "factored"
            else:
                tensors[f"lastbase/{name}"] = d
                last_kinds[name] = "dense"
        tensors.update({f"weight/{k}": v for k, v in (weights or {}).items()})
        client_tensors = {f"client/{cid}/{k}": v for cid, st in clients.items() for k, v in st.items()}
        try:
            files = {
                "server.safetensors": _write_durable(tmp / "server.safetensors", _tensor_writer(tensors)),
                "clients.safetensors": _write_durable(tmp / "clients.safetensors", _tensor_writer(client_tensors)),
            }
            state = {
                "format": CHECKPOINT_FORMAT,
                "round": server.round,
                "meta": server.meta,
                "base_version": server.base_version,
                "last_base_update": last_kinds,
                "client_base": {str(k): v for k, v in server.client_base.items()},
                "files": files,
            }
            _write_durable(tmp / "state.json", _json_text(state))
            _fsync_dir(tmp)
            if final.exists():  # a damaged or superseded checkpoint of the same round
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(root)
        self._intact.add(final.name)
        self._apply_retention(final)
        return final

    def _apply_retention(self, written: Path) -> None:
        """Delete all but the newest ``keep_checkpoints`` intact checkpoints (``written`` always stays)."""
        if self.keep_checkpoints is None:
            return
        number = _checkpoint_number(written)
        assert number is not None
        kept = 1
        for ckpt in self.checkpoints():
            if ckpt == written:
                continue
            n = _checkpoint_number(ckpt)
            if kept < self.keep_checkpoints and n is not None and n < number and self._is_intact(ckpt):
                kept += 1
                continue
            shutil.rmtree(ckpt, ignore_errors=True)
            self._intact.discard(ckpt.name)
        _fsync_dir(self.checkpoints_root)

    def _is_intact(self, ckpt: Path) -> bool:
        if ckpt.name in self._intact:
            return True
        try:
            self.verify_checkpoint(ckpt)
        except RunDirError:
            return False
        self._intact.add(ckpt.name)
        return True

    @staticmethod
    def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
        """Check that ``ckpt`` is complete, that its tensor files match their recorded sha256 and size and have
        valid headers, and that ``state.json`` is well-formed and names only tensors that exist (no tensor is
        loaded); returns its ``state.json``. RunDirError saying what is wrong otherwise."""
        state_file = ckpt / "state.json"
        if not state_file.is_file():
            raise RunDirError("incomplete: no state.json")
        try:
            state = json.loads(state_file.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise RunDirError(f"state.json cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"state.json line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(state, dict):
            raise RunDirError("state.json does not hold a JSON object")
        n = _checkpoint_number(ckpt)
        if n is not None and state.get("round") != n:
            raise RunDirError(f"state.json says round {state.get('round')!r}, the directory name says {n}")
        files = state.get("files")
        if files is None and "format" not in state:
            files = {}  # written before checksums existed: only presence can be checked
        if not isinstance(files, dict):
            raise RunDirError("state.json has no valid 'files' entry (tensor file checksums)")
        for name in TENSOR_FILES:
            path = ckpt / name
            if not path.is_file():
                raise RunDirError(f"incomplete: no {name}")
            if not files:
                continue
            expected = files.get(name)
            if not isinstance(expected, dict) or "sha256" not in expected or "bytes" not in expected:
                raise RunDirError(f"state.json records no checksum for {name}")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise RunDirError(f"{name} has {size} bytes, state.json recorded {expected['bytes']}")
            if _file_digest(path) != expected["sha256"]:
                raise RunDirError(f"{name} fails its sha256 checksum")
        _check_state(state, _tensor_keys(ckpt / TENSOR_FILES[0]), _tensor_keys(ckpt / TENSOR_FILES[1]))
        return state

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that is complete and passes its checksums."""
        for ckpt in self.checkpoints():
            if self._is_intact(ckpt):
                return ckpt
        return None

    def _remove_stale_tmp(self) -> None:
        root = self.checkpoints_root
        if not root.is_dir():
            return
        for p in root.glob("*.tmp"):
            log.warning("removing %s left by an interrupted checkpoint write", p.relative_to(self.path))
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def load_latest(self) -> Checkpoint | None:
        """The newest intact checkpoint (``(server state, client states, base weights)``), or None.

        Damaged checkpoints (incomplete, failing their checksums, or unloadable) are skipped with a warning; the
        one used is logged and kept in :attr:`last_loaded`. Leftover ``*.tmp`` directories are removed.
        """
        self.last_loaded = None
        self._remove_stale_tmp()
        damaged: list[str] = []
        for ckpt in self.checkpoints():
            try:
                found = self.load_checkpoint(ckpt)
            except RunDirError as e:
                log.warning("skipping checkpoints/%s: %s", ckpt.name, e)
                damaged.append(f"{ckpt.name} is damaged: {e}")
                continue
            self._intact.add(ckpt.name)
            self.last_loaded = ckpt
            note = f" ({'; '.join(damaged)})" if damaged else ""
            log.info("resuming from checkpoints/%s%s", ckpt.name, note)
            return found
        if damaged:
            log.warning("%s: no intact checkpoint (%s)", self.path, "; ".join(damaged))
        return None

    @staticmethod
    def load_checkpoint(ckpt: Path) -> Checkpoint:
        """``(server state, per-client states, base weights)`` of a checkpoint; RunDirError when it is damaged."""
        state = RunDir.verify_checkpoint(ckpt)
        tensors, client_tensors = (_load_tensors(ckpt / name) for name in TENSOR_FILES)

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        last: dict[str, Any] = {}
        for name, kind in state.get("last_base_update", {}).items():
            if kind == "factored":
                last[name] = (tensors[f"lastbase/{name}/B"], tensors[f"lastbase/{name}/A"])
            else:
                last[name] = tensors[f"lastbase/{name}"]
        clients: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in client_tensors.items():
            _, cid, name = key.split("/", 2)
            clients.setdefault(int(cid), {})[name] = value
        server = ServerState(
            round=int(state["round"]),
            adapter=group("adapter/"),
            tensors=group("state/"),
            meta=dict(state.get("meta", {})),
            base_delta=group("base/"),
            base_version=int(state.get("base_version", 0)),
            last_base_update=last,
            client_base={int(k): int(v) for k, v in state.get("client_base", {}).items()},
        )
        return server, clients, group("weight/")

    # ------------------------------------------------------------------ final artefacts
    def save_base_delta(self, base_delta: Mapping[str, torch.Tensor]) -> None:
        if base_delta:
            _atomic_write(self.path / "base_delta.safetensors", _tensor_writer(base_delta))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _atomic_write(self.path / "summary.json", _json_text(summary))

    @property
    def initial_path(self) -> Path:
        return self.path / "initial.json"

    def write_initial(self, metrics: Mapping[str, Any]) -> None:
        """The metrics of the model before the first round (``initial.json``, written once, atomically)."""
        _atomic_write(self.initial_path, _json_text(dict(metrics)))

    def read_initial(self) -> dict[str, Any]:
        """``initial.json`` (empty when the run has none, or when it is unreadable: it is informative only)."""
        try:
            data = json.loads(self.initial_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def plot(self) -> Path | None:
        """``metrics.png``: the task's scores (accuracy; exact match, ROUGE-L; ...) and the losses per round
        (matplotlib, imported only here)."""
        records = [r for r in self.read_metrics() if "round" in r]
        if not records:
            return None
        initial = self.read_initial()
        if initial:  # round 0: the model before any training
            records = [{**initial, "round": 0}, *records]
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in records]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        scopes = {"global": "global (held-out)", "personal": "personalised"}
        # every metric the task reported (global_<m>, personal_<m>) but losses (right panel) and perplexity (their
        # exponential): accuracy for classification, exact match and ROUGE-L for the causal LM, ...
        scores = sorted(
            {
                key.split("_", 1)[1]
                for r in records
                for key, value in r.items()
                if key.split("_", 1)[0] in scopes
                and "_" in key
                and isinstance(value, int | float)
                and key.split("_", 1)[1] not in ("loss", "perplexity")
            }
        )
        for name in scores:
            for scope, where in scopes.items():
                key = f"{scope}_{name}"
                if any(key in r for r in records):
                    label = where if len(scores) == 1 else f"{name}, {where}"
                    ax_acc.plot(rounds, [r.get(key) for r in records], marker="o", label=label)
        for key, label in (
            ("train_loss", "train"),
            ("global_loss", "global (held-out)"),
            ("personal_loss", "personalised"),
        ):
            if any(key in r for r in records):
                ax_loss.plot(rounds, [r.get(key) for r in records], marker="o", label=label)
        title = scores[0] if len(scores) == 1 else "score"
        ax_acc.set(xlabel="round", ylabel=title, title=title.capitalize())
        ax_loss.set(xlabel="round", ylabel="loss", title="Loss")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_acc, ax_loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.suptitle(self.path.name)
        fig.tight_layout()
        out = self.path / "metrics.png"
        try:
            _atomic_write(out, lambda p: fig.savefig(p, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return out
