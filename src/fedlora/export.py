"""A run's trained model, usable anywhere: label names, the real base model's name, ``fedlora export``.

What a run directory holds is not always a model peft can rebuild alone: FedEx-LoRA and FLoRA change the frozen
base weights (``base_delta.safetensors``), FedDPA's client models are two adapters used together, FedALT's mix two
adapters per token through a trained gate (``token_gate.safetensors``, which peft does not read), and FedSA-LoRA
has no global adapter at all. This module

* checks which trained model of a run is asked for and whether the run finished it (:func:`open_trained`);
* builds it: the base model (the run's ``config.json`` names it, so the embedded default model loads offline), plus
  the base-weight change, plus the adapter(s) and their token-wise gate, with the run's label names in the model
  config (:func:`build_base`, :func:`attach_adapters`; ``fedlora.load_trained`` is these two);
* describes each saved adapter directory so that it makes sense on another machine: ``base_model_name_or_path``
  names the real base model (:func:`public_model_name`) and ``labels.json`` lists the label names
  (:func:`describe_saved_adapter`);
* writes an export (:func:`export`): either one merged ``transformers`` model directory, or (``merged=False``)
  ``OUT/base`` (the base weights with the base-weight change, a plain ``transformers`` model) and ``OUT/adapter``
  (one plain peft adapter whose config points at ``OUT/base``). A model with a token-wise gate has neither form:
  its mix depends on each token, so it is refused (``fedlora.load_trained`` builds it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.adapters.peft_io import GATE_FILE
from fedlora.config import ConfigError, RunConfig
from fedlora.runs import RunDirError

DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The Hugging Face hub id of the embedded default model (``model = "default"``)."""
EXPORT_MARKER = "fedlora-export.json"
"""The file that marks a directory as written by :func:`export` (such a directory may be overwritten)."""
LABELS_FILE = "labels.json"
"""Written into every saved adapter directory: ``{"labels": [name of class 0, name of class 1, ...]}``."""
GLOBAL_ADAPTER = "adapter"
PERSONAL_ROOT = "personal"
_PEFT_PREFIX = "base_model.model."
_CLIENT_RE = re.compile(r"personal/client-(\d+)")


class ExportError(RunDirError):
    """The export's output directory cannot be used, or the trained model cannot be written."""


def public_model_name(model: str) -> str:
    """The name of a run's base model that means the same thing on any machine: a hub id as given, the embedded
    default model's hub id for ``"default"`` (and for ``"smollm2-135m-instruct"`` the hub model it quantises: its
    weights differ slightly), the absolute path of a local directory."""
    from fedlora.models.gguf import SMOLLM2, SMOLLM2_HUB_ID
    from fedlora.models.loading import DEFAULT_MODEL

    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    if model == SMOLLM2:  # the embedded causal LM is a 4-bit (Q4_1) quantisation of this hub model
        return SMOLLM2_HUB_ID
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    return model


def client_adapter(client: int) -> str:
    """The adapter path (relative to the run directory) of client ``client``'s own model."""
    return f"{PERSONAL_ROOT}/client-{client}"


# ---------------------------------------------------------------------------------------------- which model
@dataclass(frozen=True)
class TrainedModel:
    """One trained model of a finished run, checked to exist (nothing loaded yet)."""

    run_dir: Path
    config: RunConfig
    adapter: str
    """``"adapter"`` or ``"personal/client-K"``."""
    labels: list[str]
    named_adapters: tuple[str, ...]
    """Sub-adapters used together with the default one (e.g. FedDPA's ``local``), in load order."""
    token_gate: tuple[str, ...] = ()
    """The peft adapters a token-wise gate mixes (FedALT's), saved in ``token_gate.safetensors``; empty: no gate."""

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / self.adapter

    @property
    def base_delta_file(self) -> Path:
        return self.run_dir / "base_delta.safetensors"

    @property
    def gate_file(self) -> Path:
        return self.adapter_dir / GATE_FILE


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None


def _choices(config: RunConfig, cls: type) -> str:
    options = [GLOBAL_ADAPTER] if cls.has_global_model else []
    if cls.has_personal_state:
        last = config.clients - 1
        options.append(client_adapter(0) if last == 0 else f"{client_adapter(0)} … {client_adapter(last)}")
    return " or ".join(options)


def _normalise_adapter(adapter: str, client: int | None) -> str:
    if client is not None:
        if isinstance(client, bool) or not isinstance(client, int):
            raise RunDirError(f"client={client!r} must be a client number (an integer)")
        if client < 0:
            raise RunDirError(f"client={client} must be >= 0")
        wanted = client_adapter(client)
        given = str(adapter).strip().strip("/")
        if given not in (GLOBAL_ADAPTER, wanted):
            raise RunDirError(f"adapter={adapter!r} and client={client} disagree; give one of them")
        return wanted
    name = str(adapter).strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def open_trained(
    run_dir: str | os.PathLike[str], adapter: str = GLOBAL_ADAPTER, *, client: int | None = None
) -> TrainedModel:
    """Check that ``run_dir`` is a finished run holding the trained model ``adapter`` (``"adapter"``, the global
    model, or ``"personal/client-K"``; ``client=K`` is the same as the latter). RunDirError saying what is wrong
    (and what to ask for instead) otherwise. Reads only small JSON files."""
    from fedlora.methods import OptionError, get_method_class, parse_options

    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise RunDirError(f"run directory {str(path)!r} does not exist" if not path.exists() else f"{path} is a file")
    config_path = path / "config.json"
    raw = _read_json(config_path, "not a finished fedlora run directory: it has no config.json")
    if not isinstance(raw, dict):
        raise RunDirError(f"{config_path} must hold a JSON object, not {type(raw).__name__}")
    try:
        config = RunConfig.from_dict(raw)
    except ConfigError as e:
        raise RunDirError(f"{config_path}: {e}") from None
    try:
        cls = get_method_class(config.method)
    except ValueError as e:
        raise RunDirError(f"{config_path}: {e}") from None

    name = _normalise_adapter(adapter, client)
    match = _CLIENT_RE.fullmatch(name)
    if name == GLOBAL_ADAPTER:
        if not cls.has_global_model:
            raise RunDirError(
                f"method {config.method!r} has no global adapter (each client keeps its own model); "
                f"choose a client's model: {_choices(config, cls)} (load_trained(run, client=K), "
                "fedlora export --adapter personal/client-K)"
            )
    elif match:
        if not cls.has_personal_state:
            raise RunDirError(
                f"method {config.method!r} keeps no per-client models; its trained model is {GLOBAL_ADAPTER!r}"
            )
        cid = int(match.group(1))
        if cid >= config.clients:
            raise RunDirError(
                f"client {cid} is out of range: the run has {config.clients} clients; choose {_choices(config, cls)}"
            )
    else:
        raise RunDirError(f"adapter {adapter!r} is not a model of this run; choose {_choices(config, cls)}")

    try:
        gate = cls.gate_of(parse_options(cls, config.method_options)) if match else ()
    except OptionError as e:
        raise RunDirError(f"{config_path}: {e}") from None
    _check_finished(path, config, name, cls.extra_adapters if match else (), gated=bool(gate))
    info = _read_json(path / "data.json", "the run's label names")
    labels = info.get("labels") if isinstance(info, dict) else None
    if not isinstance(labels, list) or not labels:
        raise RunDirError(f"{path / 'data.json'} has no 'labels' list")
    return TrainedModel(
        path,
        config,
        name,
        [str(x) for x in labels],
        tuple(sorted(cls.extra_adapters if match else ())),
        tuple(ns or "default" for ns in gate),
    )


def _check_finished(
    path: Path, config: RunConfig, adapter: str, named: tuple[str, ...], *, gated: bool = False
) -> None:
    """The run's final adapters are written (after its last round) before ``summary.json``; a run that is still
    going, was killed, or was extended (``--resume --rounds N``) and not finished has no summary of its rounds."""
    resume = f"`fedlora run --resume {path}` finishes it"
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise RunDirError(
            f"the run in {path} has not finished (no summary.json, no final {adapter}/): it is still going or was "
            f"interrupted; {resume}"
        )
    summary = _read_json(summary_path, "the run's final metrics")
    done = summary.get("rounds") if isinstance(summary, dict) else None
    if isinstance(done, int) and done != config.rounds:
        raise RunDirError(
            f"the run in {path} was extended to {config.rounds} rounds and has not finished them (its final "
            f"adapters are those of round {done}); {resume}"
        )
    for sub in ("", *named):
        target = path / adapter / sub if sub else path / adapter
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            if not (target / file).is_file():
                raise RunDirError(
                    f"the run in {path} has no finished {adapter}/ ({target / file} is missing); {resume}"
                )
    if gated and not (path / adapter / GATE_FILE).is_file():
        raise RunDirError(f"the run in {path} has no finished {adapter}/ ({path / adapter / GATE_FILE} is missing)")


# ---------------------------------------------------------------------------------------------- building it
def set_labels(config: Any, labels: list[str]) -> None:
    """Put the label names into a transformers model config (``id2label`` and ``label2id``)."""
    config.id2label = {i: name for i, name in enumerate(labels)}
    config.label2id = {name: i for i, name in enumerate(labels)}


def apply_base_delta(model: torch.nn.Module, delta: dict[str, torch.Tensor], source: Path | str = "") -> None:
    """``W0 += Δ`` on a plain transformers model for each module of a run's ``base_delta.safetensors``.

    The keys are the modules' names in the peft model of the run (``base_model.model.`` + the plain name); Δ is in
    nn.Linear layout ``(out, in)`` and is transposed for GPT-2-style ``Conv1D`` weights (stored ``(in, out)``).
    """
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for key, value in delta.items():
            name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise RunDirError(f"{source}: module {key!r} is not in the base model") from None
            weight = getattr(module, "weight", None)
            dense = value.float().T if isinstance(module, Conv1D) else value.float()
            if weight is None or tuple(weight.shape) != tuple(dense.shape):
                shape = None if weight is None else tuple(weight.shape)
                raise RunDirError(f"{source}: {key!r} has shape {tuple(value.shape)}, the base weight {shape}")
            weight.add_(dense.to(weight.dtype))


def build_base(trained: TrainedModel) -> torch.nn.Module:
    """The run's base model (its ``config.json`` names it: the embedded default model loads offline) with the
    base-weight change of methods that make one, and the label names in its config."""
    from fedlora.tasks import get_task

    cfg = trained.config
    base = get_task(cfg.task).load_model(cfg.model, num_labels=len(trained.labels), seed=cfg.seed)
    set_labels(base.config, trained.labels)
    if trained.base_delta_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            delta = load_file(str(trained.base_delta_file))
        except (SafetensorError, OSError) as e:
            raise RunDirError(f"cannot load {trained.base_delta_file}: {e}") from None
        apply_base_delta(base, delta, trained.base_delta_file)
    return base


def attach_adapters(base: torch.nn.Module, trained: TrainedModel) -> torch.nn.Module:
    """Wrap ``base`` with the trained adapter (and its named sub-adapters, all active with their saved scales), and
    install the model's token-wise gate when it has one (``token_gate.safetensors``: plain ``PeftModel`` does not)."""
    from peft import PeftModel

    from fedlora.adapters.peft_io import load_token_gates

    model = PeftModel.from_pretrained(base, str(trained.adapter_dir))
    if trained.named_adapters:
        from peft.tuners.lora import LoraLayer

        for name in trained.named_adapters:
            model.load_adapter(str(trained.adapter_dir / name), adapter_name=name)
        for module in model.modules():
            if isinstance(module, LoraLayer):  # peft's per-layer switch: the model-level one takes one adapter
                module.set_adapter(["default", *trained.named_adapters])
    if trained.token_gate:
        try:
            gates = load_token_gates(model, trained.gate_file)
        except ValueError as e:
            raise RunDirError(str(e)) from None
        if gates.adapters != trained.token_gate:
            raise RunDirError(f"{trained.gate_file} gates {list(gates.adapters)}, the run {list(trained.token_gate)}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------- saved adapters
def _rewrite_base_name(target: Path, name: str) -> None:
    """Point every adapter config under ``target`` (and peft's model card) at the base model ``name``."""
    for cfg_path in sorted(target.rglob("adapter_config.json")):
        cfg = json.loads(cfg_path.read_text())
        old = cfg.get("base_model_name_or_path")
        cfg["base_model_name_or_path"] = name
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        card = cfg_path.parent / "README.md"
        if old and old != name and card.is_file():
            card.write_text(card.read_text().replace(str(old), name))


def describe_saved_adapter(target: Path, model: str, labels: list[str]) -> None:
    """Make a saved adapter directory self-describing: ``base_model_name_or_path`` (in each adapter config) names
    the real base model (:func:`public_model_name` of the run's ``model``), ``labels.json`` the label names."""
    _rewrite_base_name(target, public_model_name(model))
    (target / LABELS_FILE).write_text(json.dumps({"labels": list(labels)}, indent=2) + "\n")


def staging_dir(final: Path) -> Path:
    """An empty hidden directory next to ``final`` to write into before :func:`replace_dir`."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing what was there (two renames: a kill leaves the
    old directory or the new one in place, or both under hidden names)."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- export
def _lora_scale(cfg: dict[str, Any], where: Path) -> float:
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise RunDirError(f"{where}: per-module ranks or alphas (rank_pattern/alpha_pattern) cannot be combined")
    r = int(cfg["r"])
    return float(cfg["lora_alpha"]) / (r**0.5 if cfg.get("use_rslora") else r)


def _combined_adapter(trained: TrainedModel, out: Path, base_name: str) -> None:
    """Write the default adapter and its named sub-adapters as ONE peft adapter into ``out``: for every module the
    factors are stacked (A = [A_1; A_2], B = [s_1·B_1, s_2·B_2], scale 1), so ``s_1·B_1@A_1 + s_2·B_2@A_2`` is
    exactly what plain ``PeftModel.from_pretrained`` applies; the heads are the default adapter's."""
    from safetensors.torch import load_file, save_file

    from fedlora.adapters.state import LORA_A_SUFFIX, LORA_B_SUFFIX

    dirs = [trained.adapter_dir] + [trained.adapter_dir / n for n in trained.named_adapters]
    cfgs = [json.loads((d / "adapter_config.json").read_text()) for d in dirs]
    scales = [_lora_scale(c, d / "adapter_config.json") for c, d in zip(cfgs, dirs, strict=True)]
    states = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    lora_keys = {k for k in states[0] if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}
    for d, st in zip(dirs[1:], states[1:], strict=True):
        theirs = {k for k in st if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}
        if theirs != lora_keys:
            raise RunDirError(f"{d} adapts other modules than {trained.adapter_dir}; cannot combine them")
    combined = {k: v for k, v in states[0].items() if k not in lora_keys}
    for key in sorted(lora_keys):
        if key.endswith(LORA_A_SUFFIX):
            combined[key] = torch.cat([st[key] for st in states], dim=0).contiguous()
        else:
            combined[key] = torch.cat([s * st[key] for s, st in zip(scales, states, strict=True)], dim=1).contiguous()
    rank = sum(int(c["r"]) for c in cfgs)
    cfg = dict(cfgs[0], r=rank, lora_alpha=float(rank), use_rslora=False, base_model_name_or_path=base_name)
    out.mkdir(parents=True)
    save_file(combined, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _check_out(out: Path) -> None:
    """``out`` is missing, an empty directory or an earlier export; its parent can be created and written to."""
    if out == Path(out.anchor) or out == Path.cwd():
        raise ExportError(f"output {str(out)!r} is the current or the root directory; give a directory to create")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"output {str(out)!r} exists and is not a directory; refusing to replace it")
    if out.is_dir():
        try:
            entries = list(out.iterdir())
        except OSError as e:
            raise ExportError(f"cannot read output directory {str(out)!r}: {e.strerror or e}") from None
        if entries and not (out / EXPORT_MARKER).is_file():
            raise ExportError(
                f"output directory {str(out)!r} is not empty and is not an earlier fedlora export (no "
                f"{EXPORT_MARKER}); refusing to write into it: give a new or empty directory"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ExportError(f"cannot create output {str(out)!r}: a part of its path is a file") from None
    except OSError as e:
        raise ExportError(f"cannot create output {str(out)!r}: {e.strerror or e}") from None


def export(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    adapter: str = GLOBAL_ADAPTER,
    client: int | None = None,
    merged: bool = True,
) -> Path:
    """Write a run's trained model (``adapter``: ``"adapter"`` or ``"personal/client-K"``; or ``client=K``) to
    ``out``, usable without fedlora. Returns the absolute output path.

    ``merged=True``: one ``transformers`` model directory (base + base-weight change + adapter(s) merged, with the
    tokenizer and the label names): ``AutoModelForSequenceClassification.from_pretrained(out)``.
    ``merged=False``: ``out/base`` (base + base-weight change, tokenizer, label names; a plain ``transformers``
    model) and ``out/adapter`` (one plain peft adapter whose ``base_model_name_or_path`` is ``out/base``):
    ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(out/"base"), out/"adapter")``.

    ``out`` must be missing, empty, or an earlier export (which is replaced). Everything is checked before the
    model is loaded, written into a temporary directory next to ``out`` and renamed into place at the end.
    """
    from fedlora.models import load_tokenizer

    trained = open_trained(run_dir, adapter, client=client)
    if trained.token_gate:
        raise ExportError(
            f"{trained.adapter} of method {trained.config.method!r} mixes its adapters per token through a trained "
            "gate (token_gate.safetensors): that is neither a merged model nor one peft adapter. Load it with "
            f"fedlora.load_trained({str(trained.run_dir)!r}, adapter={trained.adapter!r})"
        )
    out_path = Path(os.path.abspath(Path(out).expanduser()))
    _check_out(out_path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    except OSError as e:
        raise ExportError(f"output {str(out_path)!r} is not writable: {e.strerror or e}") from None
    try:
        base = build_base(trained)
        tokenizer = load_tokenizer(trained.config.model)
        if merged:
            model = attach_adapters(base, trained).merge_and_unload()
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        else:
            base.save_pretrained(str(tmp / "base"))
            tokenizer.save_pretrained(str(tmp / "base"))
            base_name = str(out_path / "base")
            if trained.named_adapters:
                _combined_adapter(trained, tmp / "adapter", base_name)
            else:
                shutil.copytree(trained.adapter_dir, tmp / "adapter")
                _rewrite_base_name(tmp / "adapter", base_name)
            (tmp / "adapter" / LABELS_FILE).write_text(json.dumps({"labels": trained.labels}, indent=2) + "\n")
        record = {
            "format": 1,
            "run_dir": str(trained.run_dir.resolve()),
            "adapter": trained.adapter,
            "method": trained.config.method,
            "base_model": public_model_name(trained.config.model),
            "merged": merged,
            "labels": trained.labels,
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out_path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write the export to {out_path}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path
