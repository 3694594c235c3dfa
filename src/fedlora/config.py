"""The run configuration: one typed, validated, flat dataclass.

Every option has a type, a default and a help text (the CLI's ``--help`` and the README's option table are made
from them). Values enter through :meth:`RunConfig.from_dict` (a TOML/JSON file, CLI flags, Python), which
rejects an unknown key or a bad value before any work starts, naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and the allowed values."""


def _opt(
    default: Any,
    help: str,
    kind: type | str,
    *,
    choices: Any = None,
    nullable: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    meta = {"help": help, "kind": kind, "choices": choices, "nullable": nullable, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _method_choices() -> list[str]:
    from fedlora.methods import get_method_class, method_ids

    return method_ids() + sorted(a for m in method_ids() for a in get_method_class(m).aliases)


@dataclass(frozen=True)
class RunConfig:
    """All options of a federated run (see ``fedlora run --help`` and the README's option table)."""

    # what runs
    method: str = _opt("fedit", "federated method id (see `fedlora methods`)", str, choices=_method_choices)
    method_options: dict = _opt(
        {}, "method-specific options, typed and checked (`fedlora methods ID` lists them), e.g. local_head=false", dict
    )
    weighting: str = _opt(
        "auto",
        "client weights: auto (the method's paper), num_examples, samples_seen, uniform",
        str,
        choices=("auto", "num_examples", "samples_seen", "uniform"),
    )
    max_weight_ratio: float | None = _opt(
        3.0,
        "cap on a client's weight as a multiple of the uniform share 1/K (water-filling: the excess goes to the "
        "others in proportion), so a client claiming huge counts cannot own the round; >= 1, null: no cap",
        float,
        nullable=True,
        minimum=1.0,
    )
    aggregator: str = _opt(
        "mean",
        "how client tensors are combined: mean (weighted), median or trimmed_mean:<beta> (0<beta<0.5: drop the "
        "ceil(beta*K) largest and smallest values per coordinate); robust ones are coordinate-wise and unweighted, "
        "refused by methods whose aggregate is not an average of what travels (e.g. fedex_lora, flora, flexlora)",
        str,
    )
    rounds: int = _opt(5, "number of federated rounds", int, minimum=1)
    clients: int = _opt(8, "number of clients the data is partitioned into", int, minimum=1)
    clients_per_round: int | None = _opt(
        None, "clients sampled per round (default: all)", int, nullable=True, minimum=1
    )
    client_fraction: float | None = _opt(
        None,
        "fraction of clients sampled per round (alternative to clients_per_round)",
        float,
        nullable=True,
        minimum=0.0,
        maximum=1.0,
    )
    client_sampling: str = _opt(
        "fixed",
        "how a round's clients are drawn (seeded): fixed (clients_per_round, or client_fraction of all, or all; "
        "without replacement) or poisson (each client independently with probability client_fraction; a round may "
        "have none)",
        str,
        choices=("fixed", "poisson"),
    )
    seed: int = _opt(0, "seed of every random choice: splits, sampling, init, shuffling, dropout", int)
    # model and adapter
    model: str = _opt(
        "default",
        "'default' (the task's embedded model: all-MiniLM-L6-v2 for classification, SmolLM2-135M-Instruct for "
        "causal-lm), 'smollm2-135m-instruct', a local directory, a local .gguf file or a Hugging Face hub id",
        str,
    )
    task: str = _opt(
        "classification",
        "classification (a label per text) or causal-lm (supervised fine-tuning of a decoder: prompt -> response, "
        "loss on the response tokens only)",
        str,
        choices=("classification", "causal-lm"),
    )
    lora_r: int = _opt(8, "LoRA rank of the global adapter (the largest client rank)", int, minimum=1)
    lora_alpha: float = _opt(16.0, "LoRA alpha; a client of rank r_k gets the scale alpha_rule says", float, minimum=0)
    alpha_rule: str = _opt(
        "auto",
        "scale of a rank-r_k client: constant (alpha/r_k), proportional (alpha_k = alpha*r_k/lora_r, so "
        "alpha/lora_r for all), rslora (alpha/sqrt(r_k)); auto: the method's preference (proportional for methods "
        "that average factors of different ranks), else constant",
        str,
        choices=("auto", "constant", "proportional", "rslora"),
    )
    client_ranks: str | None = _opt(
        None,
        "per-client LoRA ranks: tiers cycled over clients (2,4,8 or tiers:2,4,8), an explicit list of one per "
        "client (list:2,4,8,8), or a seeded draw (random:2,4,8); default: every client at lora_r",
        str,
        nullable=True,
    )
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input", float, minimum=0.0, maximum=1.0)
    target_modules: list | None = _opt(
        None, "modules to adapt (default: per architecture, e.g. query,value for BERT)", list, nullable=True
    )
    modules_to_save: list | None = _opt(
        None, "extra fully-trained modules (default: the task head)", list, nullable=True
    )
    init_lora_weights: str = _opt(
        "default", "LoRA A init: default (kaiming-uniform) or gaussian", str, choices=("default", "gaussian")
    )
    # data
    dataset: str = _opt(
        "default",
        "'default' (embedded WordNet: supersense classification, or for causal-lm 'wordnet-definitions': \"Define "
        'the word X." -> its gloss, labelled by supersense), a local CSV/JSON/JSONL/Parquet file or a Hugging Face '
        "hub id",
        str,
    )
    dataset_config: str | None = _opt(None, "hub dataset configuration name", str, nullable=True)
    dataset_split: str = _opt("train", "split to load from a hub dataset", str)
    text_column: str = _opt("text", "column holding the input text (causal-lm: the prompt)", str)
    label_column: str = _opt(
        "label", "column holding the label (causal-lm: the group that dirichlet/natural partitions split by)", str
    )
    response_column: str = _opt("response", "causal-lm: column holding the response to learn", str)
    labels: list | None = _opt(
        None, "keep only these label values (default dataset: 8 noun supersenses)", list, nullable=True
    )
    max_examples_per_label: int | None = _opt(
        None, "cap per label, seeded (default dataset: 300; causal-lm's: 16)", int, nullable=True, minimum=1
    )
    partition: str = _opt("dirichlet:0.5", "iid | dirichlet:<alpha> | pathological:<k> | natural:<column>", str)
    global_test_fraction: float = _opt(0.1, "held-out global test fraction", float, minimum=0.0, maximum=0.9)
    client_test_fraction: float = _opt(
        0.2, "fraction of each client's data kept as its own test split", float, minimum=0.0, maximum=0.9
    )
    max_length: int = _opt(
        64, "maximum tokens per example (causal-lm: prompt + response; longer ones are cut)", int, minimum=4
    )
    prompt_format: str = _opt(
        "auto",
        "causal-lm: how a prompt is laid out: chat (the tokenizer's chat template), plain ('<prompt>\\n', the "
        "response, eos) or auto (chat when the tokenizer has a template)",
        str,
        choices=("auto", "chat", "plain"),
    )
    system_prompt: str | None = _opt(
        None, "causal-lm, chat format: the system message (null: the template's own default)", str, nullable=True
    )
    eval_generations: int = _opt(
        8,
        "causal-lm: held-out examples answered by greedy generation at every evaluation, scored by exact match and "
        "ROUGE-L against the reference (0: loss and perplexity only)",
        int,
        minimum=0,
    )
    max_new_tokens: int = _opt(32, "causal-lm: bound on the tokens generated per answer", int, minimum=1)
    # local training
    local_epochs: int = _opt(1, "local epochs per round (ignored when local_steps is set)", int, minimum=1)
    local_steps: int | None = _opt(
        None, "local optimiser steps per round (overrides local_epochs)", int, nullable=True, minimum=1
    )
    batch_size: int = _opt(16, "local training batch size", int, minimum=1)
    eval_batch_size: int = _opt(128, "evaluation batch size", int, minimum=1)
    eval_initial: bool = _opt(
        True,
        "evaluate the model before the first round (the base model with the initial adapter): initial.json, "
        "summary.json's 'initial', round 0 of metrics.png",
        bool,
    )
    optimizer: str = _opt(
        "adamw", "local optimiser (state is reset every round, as in the papers' code)", str, choices=("adamw", "sgd")
    )
    lr: float = _opt(3e-3, "local learning rate", float, minimum=0.0)
    weight_decay: float = _opt(0.0, "weight decay", float, minimum=0.0)
    momentum: float = _opt(0.0, "SGD momentum", float, minimum=0.0, maximum=1.0)
    upload_codec: str = _opt("none", "codec of what clients send: none, fp16, int8, topk:<density>", str)
    download_codec: str = _opt("none", "codec of what the server sends: none, fp16, int8, topk:<density>", str)
    max_grad_norm: float | None = _opt(
        1.0, "gradient clipping norm (null: no clipping; not applied under DP-SGD)", float, nullable=True, minimum=0
    )
    # privacy: sample-level DP-SGD
    dp_sgd_noise: float | None = _opt(
        None,
        "sample-level DP-SGD in every client (opacus, trainable LoRA tensors and heads only): noise multiplier "
        "sigma > 0 of the Gaussian noise added to each step's sum of clipped per-example gradients; batches are "
        "Poisson samples (rate batch_size/n); each client's epsilon is reported (null: off)",
        float,
        nullable=True,
    )
    dp_sgd_clip: float = _opt(
        1.0, "DP-SGD bound on each example's gradient norm (replaces max_grad_norm when DP-SGD is on); > 0", float
    )
    dp_sgd_delta: float = _opt(
        1e-5, "delta at which DP-SGD's per-client epsilon is reported; 0 < delta < 1, well below 1/n", float
    )
    # trust and failures
    norm_bound: float | None = _opt(
        3.0,
        "bound on a client's update norm, as a multiple of the round's median update norm (null: no bound)",
        float,
        nullable=True,
        minimum=1.0,
    )
    norm_action: str = _opt(
        "reject",
        "what happens to an update above norm_bound: reject (such an update is anomalous) or clip (scaled back onto "
        "the bound; it still pushes norm_bound times a typical step)",
        str,
        choices=("clip", "reject"),
    )
    min_cosine: float | None = _opt(
        0.0,
        "reject an update whose cosine similarity with the round's coordinate-wise median update is below this "
        "(catches sign-flipped updates; null: off)",
        float,
        nullable=True,
        minimum=-1.0,
        maximum=1.0,
    )
    max_failed_rounds: int | None = _opt(
        3,
        "stop the run (non-zero exit, with the reasons) after this many rounds in a row accept no reply "
        "(null: never stop early; a run that never accepts a reply always fails)",
        int,
        nullable=True,
        minimum=1,
    )
    client_dropout: float = _opt(
        0.0,
        "simulated failures: probability that a sampled client fails mid-round (seeded)",
        float,
        minimum=0.0,
        maximum=0.99,
    )
    stragglers: float = _opt(
        0.0,
        "simulated stragglers: probability that a sampled client does only straggler_work of its local steps",
        float,
        minimum=0.0,
        maximum=0.99,
    )
    straggler_work: float = _opt(0.5, "share of its local steps a straggler does", float, minimum=0.01, maximum=1.0)
    # privacy: user-level DP
    dp_clip: float | None = _opt(
        None,
        "user-level DP on: L2 bound C of one client's update (what it uploads minus what it started from, over all "
        "its uploaded tensors); > 0 (null: off)",
        float,
        nullable=True,
    )
    dp_noise: float | None = _opt(
        None,
        "user-level DP noise multiplier sigma >= 0: Gaussian noise of std sigma*dp_clip per coordinate (0: clipping "
        "only, epsilon infinite); null with dp_target_epsilon: calibrated before the run, written to config.json",
        float,
        nullable=True,
        minimum=0.0,
    )
    dp_noise_at: str = _opt(
        "server",
        "where user-level noise is added: server (trusted server: one noisy mean of the clipped updates, amplified "
        "by client sampling) or client (each client noises its own clipped update; the server is not trusted)",
        str,
        choices=("server", "client"),
    )
    dp_delta: float = _opt(1e-5, "delta of the user-level epsilon; 0 < delta < 1, well below 1/clients", float)
    dp_target_epsilon: float | None = _opt(
        None,
        "user-level epsilon budget (RDP accountant, > 0): without dp_noise the noise is calibrated to spend it in "
        "`rounds` rounds; with dp_noise the run stops cleanly before a round that would exceed it",
        float,
        nullable=True,
    )
    dp_secure_noise: bool = _opt(
        False,
        "draw user-level DP noise from the operating system's entropy, not from the run seed (not reproducible, "
        "but knowing the seed no longer reveals the noise: use it for real deployments)",
        bool,
    )
    # runtime and output
    threads: int | None = _opt(
        None, "torch CPU threads (default: 1 under CI, else torch's default)", int, nullable=True, minimum=1
    )
    out_dir: str = _opt("runs", "directory that receives run directories (created if missing)", str)
    run_name: str | None = _opt(
        None, "run directory name, a plain name inside out_dir (default: <time>-<method>)", str, nullable=True
    )
    keep_checkpoints: int | None = _opt(
        3, "keep only the newest N per-round checkpoints (null: keep all)", int, nullable=True, minimum=1
    )
    progress: bool = _opt(True, "show a progress bar", bool)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.clients_per_round is not None and self.client_fraction is not None:
            raise ConfigError("set either clients_per_round or client_fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ConfigError(f"clients_per_round={self.clients_per_round} exceeds clients={self.clients}")
        from fedlora.data import parse_partition

        try:
            parse_partition(self.partition)
        except ValueError as e:
            raise ConfigError(f"partition: {e}") from None
        from fedlora.client.codecs import parse_codec
        from fedlora.methods import get_method_class, parse_options

        for name in ("upload_codec", "download_codec"):
            try:
                parse_codec(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        cls = get_method_class(self.method)
        try:
            parse_options(cls, self.method_options)
        except ValueError as e:
            raise ConfigError(f"method_options: {e}") from None
        if self.max_weight_ratio is not None and not math.isfinite(self.max_weight_ratio):
            raise ConfigError(f"max_weight_ratio={self.max_weight_ratio!r} must be finite (null: no cap)")
        if self.dp_sgd_noise is not None and not self.dp_sgd_noise > 0:
            raise ConfigError(
                f"dp_sgd_noise={self.dp_sgd_noise!r} must be > 0 (noise 0 gives no privacy; null turns DP-SGD off)"
            )
        if not self.dp_sgd_clip > 0:
            raise ConfigError(f"dp_sgd_clip={self.dp_sgd_clip!r} must be > 0 (the per-example gradient norm bound)")
        if not 0 < self.dp_sgd_delta < 1:
            raise ConfigError(f"dp_sgd_delta={self.dp_sgd_delta!r} must be in (0, 1), e.g. 1e-5")
        from fedlora.adapters.state import parse_aggregator

        try:
            parse_aggregator(self.aggregator)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._check_sampling_and_privacy(cls)
        refusal = cls.robust_aggregation_error(self.aggregator)
        if refusal:
            raise ConfigError(f"aggregator: {refusal}")
        ranks = self.resolved_client_ranks()
        if ranks is not None:
            if max(ranks) > self.lora_r:
                raise ConfigError(
                    f"client_ranks: rank {max(ranks)} exceeds lora_r={self.lora_r} (the global adapter's rank); "
                    f"raise --lora-r to at least {max(ranks)}"
                )
            if not cls.supports_mixed_ranks and len(set(ranks)) == 1 and ranks[0] != self.lora_r:
                raise ConfigError(
                    f"client_ranks: {self.method} trains every client at the global rank; "
                    f"set --lora-r {ranks[0]} instead of client_ranks"
                )
            if len(set(ranks)) > 1 and not cls.supports_mixed_ranks:
                from fedlora.methods import method_ids

                able = [m for m in method_ids() if get_method_class(m).supports_mixed_ranks]
                raise ConfigError(
                    f"client_ranks: {self.method} trains one rank for all clients; mixed ranks need one of: "
                    + ", ".join(able)
                )

    def _check_sampling_and_privacy(self, cls: Any) -> None:
        if self.client_sampling == "poisson":
            if self.clients_per_round is not None:
                raise ConfigError(
                    "client_sampling=poisson draws each client with probability client_fraction; drop "
                    "clients_per_round and set client_fraction"
                )
            if self.client_fraction is None or not self.client_fraction > 0:
                raise ConfigError(
                    f"client_sampling=poisson needs client_fraction in (0, 1] (got {self.client_fraction!r}): the "
                    "probability with which each client joins a round"
                )
        if self.dp_clip is None:
            given = [k for k in ("dp_noise", "dp_target_epsilon") if getattr(self, k) is not None]
            if self.dp_secure_noise:
                given.append("dp_secure_noise")
            if given:
                raise ConfigError(f"{', '.join(given)} need dp_clip: user-level DP is on when dp_clip is set")
            return
        if not self.dp_clip > 0:
            raise ConfigError(f"dp_clip={self.dp_clip!r} must be > 0 (the L2 bound of one client's update)")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta={self.dp_delta!r} must be in (0, 1), e.g. 1e-5")
        if self.dp_target_epsilon is not None and not self.dp_target_epsilon > 0:
            raise ConfigError(f"dp_target_epsilon={self.dp_target_epsilon!r} must be > 0")
        if self.dp_noise is None and self.dp_target_epsilon is None:
            raise ConfigError(
                "dp_clip needs dp_noise (the noise multiplier sigma) or dp_target_epsilon (sigma is then calibrated)"
            )
        if self.dp_noise_at == "server":
            from fedlora.privacy.user_level import server_noise_refusal

            refusal = server_noise_refusal(cls)
            if refusal:
                raise ConfigError(f"dp_noise_at: {refusal}")
            if self.aggregator != "mean":
                raise ConfigError(
                    f"aggregator={self.aggregator!r} with dp_noise_at=server: every accepted update is replaced by "
                    "the same noisy mean, so a robust aggregator has nothing left to do; use aggregator=mean (the "
                    "clip dp_clip bounds each client's influence)"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Build from a mapping (keys may use '-' for '_'); strings are parsed as on the command line."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        out = dataclasses.asdict(base) if base is not None else {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {raw_key!r}{hint}; allowed keys: {', '.join(names)}")
            out[key] = _coerce(names[key], value)
        return cls(**out)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], base: RunConfig | None = None) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot parse {p}: {e}") from None
        return cls.from_dict(data, base)

    def replace(self, **changes: Any) -> RunConfig:
        return RunConfig.from_dict(changes, base=self)

    def resolved_client_ranks(self) -> list[int] | None:
        """Each client's rank from ``client_ranks`` (None: every client at ``lora_r``)."""
        if self.client_ranks is None:
            return None
        try:
            return parse_client_ranks(self.client_ranks, self.clients, self.seed)
        except ValueError as e:
            raise ConfigError(f"client_ranks: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def help_table() -> list[tuple[str, str, str]]:
        """``(name, default, help)`` for every option, in declaration order."""
        rows = []
        for f in dataclasses.fields(RunConfig):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f.name, json.dumps(default), f.metadata["help"]))
        return rows


def _choices(f: dataclasses.Field) -> Any:
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


def _check(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None:
        if not meta["nullable"]:
            raise ConfigError(f"{f.name} must not be null")
        return
    kind = meta["kind"]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{f.name}={value!r} must be of type {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{f.name}={value!r} must be a finite number")
    choices = _choices(f)
    if choices is not None and value not in choices:
        raise ConfigError(f"{f.name}={value!r} is not allowed; allowed values: {', '.join(map(str, choices))}")
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"{f.name}={value!r} must be >= {meta['min']}")
    if meta["max"] is not None and value > meta["max"]:
        raise ConfigError(f"{f.name}={value!r} must be <= {meta['max']}")
    if kind is list and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{f.name} must be a list of strings")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Parse command-line strings into the option's type; leave typed values (TOML, Python) to :func:`_check`."""
    kind = f.metadata["kind"]
    if not isinstance(value, str) or kind is str:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is list and isinstance(value, tuple):
            return list(value)
        return value
    text = value.strip()
    if f.metadata["nullable"] and text.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is list:
            return [v.strip() for v in text.split(",") if v.strip()]
        if kind is dict:
            return json.loads(text)
    except ValueError:
        raise ConfigError(f"{f.name}={value!r} is not a valid {kind.__name__}") from None
    return value


def parse_client_ranks(spec: str, clients: int, seed: int) -> list[int]:
    """Client ranks from ``tiers:a,b,..`` (or ``a,b,..``: cycled), ``list:..`` (one per client) or ``random:..``
    (each client draws one of the values, seeded)."""
    kind, _, values = spec.strip().partition(":")
    if not values:
        kind, values = "tiers", kind
    if kind not in ("tiers", "list", "random"):
        raise ValueError(f"{spec!r}: unknown form {kind!r}; allowed: tiers:<r,..>, list:<r,..>, random:<r,..>")
    try:
        ranks = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{spec!r}: ranks must be integers") from None
    if not ranks or min(ranks) < 1:
        raise ValueError(f"{spec!r}: give at least one rank, each >= 1")
    if kind == "list":
        if len(ranks) != clients:
            raise ValueError(f"{spec!r}: {len(ranks)} ranks for {clients} clients (list: needs one per client)")
        return ranks
    if kind == "tiers":
        return [ranks[k % len(ranks)] for k in range(clients)]
    import random

    from fedlora.methods.base import derive_seed

    rng = random.Random(derive_seed(seed, "client-ranks"))
    return [rng.choice(ranks) for _ in range(clients)]


def default_threads() -> int | None:
    """One torch thread under CI (two collapse on a busy 2-core machine), else torch's own default."""
    return 1 if os.environ.get("CI", "").lower() in ("1", "true", "yes") else None
