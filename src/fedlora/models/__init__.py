"""Model and tokenizer loading (embedded default model, local directories, hub ids) and LoRA wrapping."""

from fedlora.models.loading import (
    DEFAULT_MODEL,
    ModelError,
    default_model_dir,
    default_target_modules,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    wrap_lora,
)

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "default_model_dir",
    "default_target_modules",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model",
    "wrap_lora",
]
