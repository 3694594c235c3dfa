"""The run directory: resolved config, ``metrics.jsonl``, per-round checkpoints, final adapters and plots.

Layout::

    RUN_DIR/config.json             the resolved configuration (what ``--resume`` reloads)
    RUN_DIR/data.json               labels and per-client label counts
    RUN_DIR/metrics.jsonl           one JSON line per round
    RUN_DIR/checkpoints/round-NNNN/ server.safetensors, clients.safetensors, state.json
    RUN_DIR/adapter/                the final global adapter (peft ``save_pretrained``)
    RUN_DIR/base_delta.safetensors  the change of the frozen base weights (FedEx-LoRA, FLoRA), if any
    RUN_DIR/personal/client-K/      personal adapters (FedSA-LoRA), peft format
    RUN_DIR/metrics.png             accuracy and loss per round
    RUN_DIR/summary.json            final metrics

Tensors are stored with safetensors, everything else as JSON; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora.methods.base import ServerState


class RunDirError(ValueError):
    """A run directory is missing, incomplete or not resumable."""


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def create(self, config: Mapping[str, Any], data_info: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        (self.path / "data.json").write_text(json.dumps(data_info, indent=2) + "\n")
        self.metrics_path.write_text("")

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path} is not a fedlora run directory (no config.json)")
        return json.loads(self.config_path.read_text())

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, rounds_done: int) -> None:
        """Keep the lines of rounds ``< rounds_done`` (drop those written after the last checkpoint)."""
        kept = [r for r in self.read_metrics() if r["round"] < rounds_done]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, rounds_done: int) -> Path:
        return self.path / "checkpoints" / f"round-{rounds_done:04d}"

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
        round differently).
        """
        final = self.checkpoint_dir(server.round)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        _save_tensors(tmp / "server.safetensors", tensors)
        _save_tensors(
            tmp / "clients.safetensors",
            {f"client/{cid}/{k}": v for cid, st in clients.items() for k, v in st.items()},
        )
        state = {
            "round": server.round,
            "meta": server.meta,
            "base_version": server.base_version,
            "last_base_update": last_kinds,
            "client_base": {str(k): v for k, v in server.client_base.items()},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def latest_checkpoint(self) -> Path | None:
        root = self.path / "checkpoints"
        if not root.is_dir():
            return None
        done = sorted(p for p in root.glob("round-[0-9][0-9][0-9][0-9]") if (p / "state.json").is_file())
        return done[-1] if done else None

    def load_latest(self) -> tuple[ServerState, dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        ckpt = self.latest_checkpoint()
        return None if ckpt is None else self.load_checkpoint(ckpt)

    @staticmethod
    def load_checkpoint(
        ckpt: Path,
    ) -> tuple[ServerState, dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """``(server state, per-client states, base weights)`` of a checkpoint."""
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(str(ckpt / "server.safetensors"))

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        last: dict[str, Any] = {}
        for name, kind in state.get("last_base_update", {}).items():
            if kind == "factored":
                last[name] = (tensors[f"lastbase/{name}/B"], tensors[f"lastbase/{name}/A"])
            else:
                last[name] = tensors[f"lastbase/{name}"]
        clients: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in load_file(str(ckpt / "clients.safetensors")).items():
            _, cid, name = key.split("/", 2)
            clients.setdefault(int(cid), {})[name] = value
        server = ServerState(
            round=int(state["round"]),
            adapter=group("adapter/"),
            tensors=group("state/"),
            meta=state.get("meta", {}),
            base_delta=group("base/"),
            base_version=int(state.get("base_version", 0)),
            last_base_update=last,
            client_base={int(k): int(v) for k, v in state.get("client_base", {}).items()},
        )
        return server, clients, group("weight/")

    # ------------------------------------------------------------------ final artefacts
    def save_base_delta(self, base_delta: Mapping[str, torch.Tensor]) -> None:
        if base_delta:
            _save_tensors(self.path / "base_delta.safetensors", base_delta)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def plot(self) -> Path | None:
        """``metrics.png``: accuracy and loss per round (matplotlib, imported only here)."""
        records = self.read_metrics()
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] + 1 for r in records]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (("global_accuracy", "global (held-out)"), ("personal_accuracy", "personalised")):
            if any(key in r for r in records):
                ax_acc.plot(rounds, [r.get(key) for r in records], marker="o", label=label)
        for key, label in (
            ("train_loss", "train"),
            ("global_loss", "global (held-out)"),
            ("personal_loss", "personalised"),
        ):
            if any(key in r for r in records):
                ax_loss.plot(rounds, [r.get(key) for r in records], marker="o", label=label)
        ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
        ax_loss.set(xlabel="round", ylabel="loss", title="Loss")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_acc, ax_loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(self.path.name)
        fig.tight_layout()
        out = self.path / "metrics.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
