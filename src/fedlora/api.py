"""The Python API: ``fedlora.run(RunConfig(...))`` wires data, model, method and the local engine together.

It is the only layer besides the CLI that does I/O (the run directory) and reads the environment (threads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora.adapters.peft_io import install_token_gates, linear_base_weights, save_token_gates
from fedlora.adapters.state import AdapterState, LoraLayout
from fedlora.client.train import TrainSettings
from fedlora.config import ConfigError, RunConfig, default_threads
from fedlora.engines.local import ClientSplits, LocalEngine
from fedlora.federation import (
    LoopHooks,
    RoundPolicy,
    RoundReport,
    Runtime,
    Schedule,
    budget_stop,
    run_federation,
    start_state,
)
from fedlora.methods import FedMethod, MethodContext, ServerState, build_method, derive_seed
from fedlora.models.loading import ModelError, add_named_adapter, check_tokenizer
from fedlora.privacy.user_level import UserLevelDP
from fedlora.runs import RunDir
from fedlora.tasks import Task, get_task

if TYPE_CHECKING:
    from fedlora.data import FederatedData

log = logging.getLogger("fedlora")

DEFAULT_DATASET_LABEL_CAP = 300


@dataclass
class RunResult:
    """What a run produced: the run directory, the final server state and per-round records."""

    run_dir: Path
    config: RunConfig
    global_adapter: AdapterState
    base_delta: dict[str, torch.Tensor]
    personal: dict[int, AdapterState]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    """Why the run ended before ``config.rounds`` (its privacy budget was spent), or None."""
    initial: dict[str, Any] = field(default_factory=dict)
    """The metrics before the first round (``eval_initial``; empty when off)."""

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill the defaults that depend on other options (the default task's labels, weighting, threads) and make
    local paths absolute."""
    from fedlora.data import DEFAULT_DATASET, DEFAULT_LABELS
    from fedlora.data.definitions import DEFINITIONS_DATASET, DEFINITIONS_LABEL_CAP
    from fedlora.methods import get_method_class, parse_options
    from fedlora.models import DEFAULT_MODEL
    from fedlora.tasks import TASKS

    changes: dict[str, Any] = {}
    task = TASKS[cfg.task]  # 'default' model and dataset mean the task's own
    if cfg.model == DEFAULT_MODEL and task.default_model != DEFAULT_MODEL:
        changes["model"] = task.default_model
    dataset = task.default_dataset if cfg.dataset == DEFAULT_DATASET else cfg.dataset
    if dataset != cfg.dataset:
        changes["dataset"] = dataset
    if dataset in (DEFAULT_DATASET, DEFINITIONS_DATASET):
        if cfg.labels is None:
            changes["labels"] = list(DEFAULT_LABELS)
        if cfg.max_examples_per_label is None:
            cap = DEFINITIONS_LABEL_CAP if dataset == DEFINITIONS_DATASET else DEFAULT_DATASET_LABEL_CAP
            changes["max_examples_per_label"] = cap
    cls = get_method_class(cfg.method)
    if cfg.method != cls.id:
        changes["method"] = cls.id
    if cfg.weighting == "auto":
        changes["weighting"] = cls.default_weighting
    if cfg.alpha_rule == "auto":
        changes["alpha_rule"] = cls.preferred_alpha_rule
    full = dataclasses.asdict(parse_options(cls, cfg.method_options))
    if full != cfg.method_options:
        changes["method_options"] = full
    if cfg.threads is None:
        changes["threads"] = default_threads() or torch.get_num_threads()
    for key in ("model", "dataset"):  # local paths are stored absolute: --resume works from any directory
        value = changes.get(key, getattr(cfg, key))
        if value != "default" and Path(value).expanduser().exists():
            changes[key] = str(Path(value).expanduser().resolve())
    out_dir = str(Path(cfg.out_dir).expanduser().resolve())
    if out_dir != cfg.out_dir:
        changes["out_dir"] = out_dir
    if cfg.dp_clip is not None and cfg.dp_noise is None:  # user-level DP with a target: calibrate the noise
        sigma = calibrate_dp_noise(cfg.replace(**changes) if changes else cfg)
        target, rounds = cfg.dp_target_epsilon, cfg.rounds
        log.info("user-level DP: noise multiplier %.6g spends epsilon %g in %d rounds", sigma, target, rounds)
        changes["dp_noise"] = sigma
    return cfg.replace(**changes) if changes else cfg


def schedule_of(cfg: RunConfig) -> Schedule:
    """The run's client schedule: rounds and each round's sampled clients (seeded)."""
    return Schedule(
        rounds=cfg.rounds,
        num_clients=cfg.clients,
        seed=cfg.seed,
        clients_per_round=cfg.clients_per_round,
        client_fraction=cfg.client_fraction,
        sampling=cfg.client_sampling,
    )


def privacy_of(cfg: RunConfig, noise: float | None = None) -> UserLevelDP | None:
    """The run's user-level DP (None when ``dp_clip`` is not set); ``noise`` replaces ``dp_noise``. Every engine
    builds it here: the round logic adds server noise with it, the clients their own noise, the loop reports ε."""
    if cfg.dp_clip is None:
        return None
    sigma = cfg.dp_noise if noise is None else noise
    if sigma is None:
        raise ConfigError("dp_noise is not set: resolve_config calibrates it from dp_target_epsilon")
    poisson = cfg.client_sampling == "poisson"
    return UserLevelDP(
        clip=cfg.dp_clip,
        noise=sigma,
        num_clients=cfg.clients,
        sampling=cfg.client_sampling,
        per_round=None if poisson else schedule_of(cfg).per_round,
        rate=cfg.client_fraction if poisson else None,
        noise_at=cfg.dp_noise_at,
        delta=cfg.dp_delta,
        target_epsilon=cfg.dp_target_epsilon,
        seed=cfg.seed,
        secure_noise=cfg.dp_secure_noise,
    )


def calibrate_dp_noise(cfg: RunConfig) -> float:
    """The smallest noise multiplier (relative precision 1e-4) with which ``cfg.rounds`` rounds spend at most
    ``dp_target_epsilon`` under the RDP accountant (with client noise: for the client the schedule samples most)."""
    from fedlora.privacy.accounting import calibrate_noise

    if cfg.dp_clip is None or cfg.dp_target_epsilon is None:
        raise ConfigError("calibrating the noise needs dp_clip and dp_target_epsilon")
    worst = schedule_of(cfg).most_participations(cfg.rounds) if cfg.dp_noise_at == "client" else None

    def epsilon(sigma: float) -> float:
        dp = privacy_of(cfg, sigma)
        assert dp is not None
        eps = dp.epsilon(cfg.rounds, worst)
        return math.inf if eps is None else eps

    return calibrate_noise(epsilon, cfg.dp_target_epsilon)


def _settings(cfg: RunConfig) -> TrainSettings:
    return TrainSettings(
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        max_grad_norm=cfg.max_grad_norm,
        dp_sgd_noise=cfg.dp_sgd_noise,
        dp_sgd_clip=cfg.dp_sgd_clip,
        user_dp=privacy_of(cfg),
    )


@dataclass
class Setup:
    """The assembled pieces of a run (exposed for benchmarks and tests)."""

    config: RunConfig
    task: Task
    tokenizer: Any
    model: torch.nn.Module
    layout: LoraLayout
    method: FedMethod
    engine: LocalEngine
    data_info: dict[str, Any]
    pad_id: int


def build(cfg: RunConfig, on_client_done: Callable | None = None, *, data: FederatedData | None = None) -> Setup:
    """Load data and model, wrap LoRA, build the method and the local engine (no training). ``data`` replaces the
    configured dataset and partition (a Flower node that holds its own data file)."""
    from fedlora.data import label_histogram, prepare_federated_data
    from fedlora.models import load_tokenizer, wrap_lora

    if cfg.alpha_rule == "auto" or cfg.weighting == "auto":
        raise ConfigError("build() takes a resolved configuration: call fedlora.api.resolve_config first")

    task = get_task(cfg.task, cfg)
    data = data or prepare_federated_data(
        cfg.dataset,
        num_clients=cfg.clients,
        partition=cfg.partition,
        split=cfg.dataset_split,
        config_name=cfg.dataset_config,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        labels=cfg.labels,
        max_examples_per_label=cfg.max_examples_per_label,
        global_test_fraction=cfg.global_test_fraction,
        client_test_fraction=cfg.client_test_fraction,
        seed=cfg.seed,
        extra_columns=task.extra_columns,
    )
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer(tokenizer, data.clients[0].train["text"], model=cfg.model)  # the dataset's own texts
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError(f"model {cfg.model!r}: its tokenizer has neither a pad nor an eos token")
    base = task.load_model(cfg.model, num_labels=len(data.label_names), seed=cfg.seed)
    model = wrap_lora(
        base,
        task_type=task.peft_task_type,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,
        use_rslora=cfg.alpha_rule == "rslora",
        init_lora_weights=cfg.init_lora_weights,
        seed=cfg.seed,
    )
    layout = LoraLayout.from_peft_model(model, alpha_rule=cfg.alpha_rule)
    ctx = MethodContext(
        layout=layout,
        num_clients=cfg.clients,
        client_ranks=tuple(cfg.resolved_client_ranks() or ()),
        seed=cfg.seed,
        weighting=cfg.weighting,
        max_weight_ratio=cfg.max_weight_ratio,
        aggregator=cfg.aggregator,
        rounds=cfg.rounds,
        init_lora_weights=cfg.init_lora_weights,
        upload_codec=cfg.upload_codec,
        download_codec=cfg.download_codec,
        base_weights=lambda: linear_base_weights(model, layout),
    )
    method = build_method(cfg.method, ctx, options=cfg.method_options)
    for ns in method.extra_adapters:
        add_named_adapter(model, ns, seed=derive_seed(cfg.seed, "adapter", ns))
    if method.gate_adapters:  # after the last adapter: a token-wise gate over them (the method draws each client's)
        gated = [ns or "default" for ns in method.gate_adapters]
        install_token_gates(model, gated, seed=derive_seed(cfg.seed, "token_gate"))

    def enc(ds: Any) -> Any:
        return task.encode(tokenizer, ds, cfg.max_length)

    encoded: dict[int, ClientSplits] = {}  # a client given twice (a node's own data in every slot) is encoded once
    for c in data.clients:
        if id(c) not in encoded:
            encoded[id(c)] = ClientSplits(train=enc(c.train), test=enc(c.test))
    clients = [encoded[id(c)] for c in data.clients]
    engine = LocalEngine(
        model=model,
        layout=layout,
        method=method,
        task=task,
        clients=clients,
        global_test=enc(data.test),
        settings=_settings(cfg),
        seed=cfg.seed,
        pad_id=pad_id,
        eval_batch_size=cfg.eval_batch_size,
        on_client_done=on_client_done,
    )
    info = {
        "labels": data.label_names,
        "global_test_examples": len(data.test),
        "clients": [
            {"client": c.client_id, "train": len(c.train), "test": len(c.test), "label_counts": h}
            for c, h in zip(data.clients, label_histogram(data), strict=True)
        ],
    }
    return Setup(cfg, task, tokenizer, model, layout, method, engine, info, pad_id)


RESUME_OVERRIDABLE = ("rounds", "progress", "threads")


def client_sizes(engine: LocalEngine, runtime: Runtime | None = None) -> dict[int, int]:
    """Each client's training-set size as the server knows it: from its own partition of the dataset, or, for a
    client whose node holds its own data (``runtime.declared_examples``, Flower), what that node declared."""
    sizes = {cid: len(c.train) for cid, c in enumerate(engine.clients)}
    sizes.update(getattr(runtime, "declared_examples", None) or {})
    return sizes


def _policy(cfg: RunConfig, engine: LocalEngine, sizes: dict[int, int] | None = None) -> RoundPolicy:
    """The round policy of a local run: the server knows each client's training-set size and local budget."""
    sizes = sizes if sizes is not None else client_sizes(engine)
    if cfg.local_steps is not None:
        budget = {cid: cfg.local_steps * cfg.batch_size for cid in sizes}
    else:
        budget = {cid: cfg.local_epochs * n for cid, n in sizes.items()}
    if cfg.dp_sgd_noise is not None:  # a Poisson batch may hold every example: at most n per step
        from fedlora.privacy.dpsgd import pass_steps

        budget = {
            cid: n * pass_steps(n, cfg.batch_size, epochs=cfg.local_epochs, steps=cfg.local_steps)
            for cid, n in sizes.items()
        }
    return RoundPolicy(
        client_examples=sizes,
        max_samples_per_stage=budget,
        norm_bound=cfg.norm_bound,
        norm_action=cfg.norm_action,
        min_cosine=cfg.min_cosine,
        dropout=cfg.client_dropout,
        stragglers=cfg.stragglers,
        straggler_work=cfg.straggler_work,
        seed=cfg.seed,
    )


def _with_dp_sgd(runtime: Runtime, setup: Setup, schedule: Schedule, policy: RoundPolicy) -> Runtime:
    """``runtime``, reporting each client's DP-SGD epsilon when DP-SGD is on (:mod:`fedlora.privacy.dpsgd`)."""
    cfg = setup.config
    if cfg.dp_sgd_noise is None:
        return runtime
    from fedlora.privacy.dpsgd import AccountedRuntime, run_ledger

    known = client_sizes(setup.engine, runtime)
    sizes = [known[cid] for cid in range(len(setup.engine.clients))]
    return AccountedRuntime(runtime, run_ledger(cfg, setup.method, setup.engine.initial, sizes, schedule, policy))


RuntimeFactory = Callable[["Setup", RunDir], Runtime]
"""Builds the engine that does the client work from the assembled run (default: the local engine itself)."""


def run(cfg: RunConfig | None = None, *, runtime: RuntimeFactory | None = None) -> RunResult:
    """Run a federated fine-tuning job in a new run directory; returns a :class:`RunResult`.

    The run directory is reserved (atomically, inside ``out_dir``) and holds the configuration before anything
    is loaded; the round-0 checkpoint is written before any client trains, so a kill at any point is resumable.
    ``runtime`` replaces the local engine for the client work (the Flower ServerApp passes one whose clients are
    SuperNodes); everything else (sampling, validation, aggregation, checkpoints) is the same.
    """
    cfg = resolve_config(cfg or RunConfig())
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    run_dir = RunDir.reserve(cfg.out_dir, cfg.run_name, stem, keep_checkpoints=cfg.keep_checkpoints)
    run_dir.write_config(cfg.to_dict())
    log.info("run directory: %s", run_dir.path)
    from fedlora.data import DataError

    try:
        return _execute(cfg, run_dir, resuming=False, make_runtime=runtime)
    except (ConfigError, DataError, ModelError):
        if not run_dir.checkpoints():  # bad input found while loading: nothing to keep, the name stays free
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise


def resume(run_dir: str | Path, *, runtime: RuntimeFactory | None = None, **overrides: Any) -> RunResult:
    """Continue the run in ``run_dir`` after its newest intact checkpoint (from its beginning if it has none).

    The run's saved configuration is used; only ``rounds`` (to extend a run), ``progress`` and ``threads`` may
    be overridden. The result equals that of an uninterrupted run.
    """
    bad = sorted(set(overrides) - set(RESUME_OVERRIDABLE))
    if bad:
        raise ConfigError(
            f"--resume keeps the run's configuration; cannot change {bad} (allowed: {', '.join(RESUME_OVERRIDABLE)})"
        )
    rd = RunDir.open_existing(run_dir)
    cfg = resolve_config(RunConfig.from_dict(rd.read_config()).replace(**overrides))
    rd.keep_checkpoints = cfg.keep_checkpoints
    return _execute(cfg, rd, resuming=True, make_runtime=runtime)


def _execute(
    cfg: RunConfig, run_dir: RunDir, *, resuming: bool, make_runtime: RuntimeFactory | None = None
) -> RunResult:
    torch.set_num_threads(cfg.threads)
    progress = _Progress(cfg)
    setup = build(cfg, on_client_done=progress.client_done)
    engine, method = setup.engine, setup.method
    run_dir.write_data_info(setup.data_info)
    runtime: Runtime = engine if make_runtime is None else make_runtime(setup, run_dir)
    server = start_state(method, runtime, run_dir, engine.initial, resume=resuming)
    if server.round > cfg.rounds:
        raise ConfigError(
            f"the run in {run_dir.path} has completed {server.round} rounds; --rounds must be at least {server.round}"
        )
    if resuming:
        run_dir.write_config(cfg.to_dict())  # an extended run stays extended when resumed again
    if cfg.eval_initial and server.round == 0 and not run_dir.initial_path.is_file():
        initial = evaluate_initial(engine, server, personal=runtime is engine)
        run_dir.write_initial(initial)
        progress.initial(initial)
    schedule = schedule_of(cfg)
    privacy = privacy_of(cfg)
    if privacy is not None:
        log.info(
            "user-level DP: clip %g, noise multiplier %g at the %s, %s sampling, delta %g; epsilon for %s neighbours",
            privacy.clip,
            privacy.noise,
            privacy.noise_at,
            privacy.sampling,
            privacy.delta,
            privacy.neighbours(),
        )
    policy = _policy(cfg, engine, client_sizes(engine, runtime))
    server = run_federation(
        method,
        _with_dp_sgd(runtime, setup, schedule, policy),
        run_dir,
        schedule,
        server,
        progress,
        policy=policy,
        max_failed_rounds=cfg.max_failed_rounds,
        privacy=privacy,
    )
    _save_final(run_dir, setup, server, engine, personal=runtime is engine)
    history = run_dir.read_metrics()
    stopped = budget_stop(privacy, schedule, server.round) if server.round < cfg.rounds else None
    initial = run_dir.read_initial()
    summary: dict[str, Any] = {"rounds": cfg.rounds, "method": cfg.method, "final": history[-1] if history else {}}
    if initial:
        summary["initial"] = initial
    if privacy is not None:
        summary["privacy"] = {
            "dp_clip": privacy.clip,
            "dp_noise": privacy.noise,
            "dp_noise_at": privacy.noise_at,
            "client_sampling": privacy.sampling,
            "dp_delta": privacy.delta,
            "dp_epsilon": history[-1].get("dp_epsilon") if history else 0.0,
            "neighbours": privacy.neighbours(),
        }
    if stopped:
        summary["rounds_done"], summary["stopped"] = server.round, stopped
    run_dir.write_summary(summary)
    return RunResult(
        run_dir.path,
        cfg,
        server.adapter,
        server.base_delta,
        runtime.client_states(),
        history,
        stopped=stopped,
        initial=initial,
    )


def evaluate_initial(engine: LocalEngine, server: ServerState, *, personal: bool = True) -> dict[str, float]:
    """The metrics of the model before the first round (``server`` fresh from ``init_server``): the global model
    on the global test split, and with ``personal`` (the clients' data is on this machine) each client's starting
    model on its own test split, named as a round's metrics are."""
    metrics = engine.evaluate_global(server)
    if personal and engine.method.has_personal_state:
        metrics.update(engine.evaluate_personal(server))
    return metrics


def _save_final(run_dir: RunDir, setup: Setup, server: Any, engine: LocalEngine, *, personal: bool = True) -> None:
    """The global adapter, and each client's own adapters (all of its named adapters, when ``personal``: the
    server holds them), in peft's format, with its token-wise gate (``token_gate.safetensors``) when the method has one.

    Each directory is written under a hidden name and renamed into place when complete; its adapter configs name
    the real base model (hub id, or a local directory's absolute path) and ``labels.json`` lists the label names.
    """
    from fedlora.export import describe_saved_adapter, replace_dir, staging_dir

    slots = engine.slots
    extra = list(setup.method.extra_adapters)
    labels = list(setup.data_info["labels"])
    if setup.method.has_global_model:
        slots.load(engine.initial)
        slots.load(server.adapter)
        slots.reset_scales()
        tmp = staging_dir(run_dir.path / "adapter")
        setup.model.save_pretrained(str(tmp), selected_adapters=["default"])
        describe_saved_adapter(tmp, setup.config.model, labels)
        replace_dir(tmp, run_dir.path / "adapter")
    run_dir.save_base_delta(server.base_delta)
    if setup.method.has_personal_state and personal:
        root = staging_dir(run_dir.path / "personal")
        try:
            for cid in range(len(engine.clients)):
                engine.load_client_model(cid, server)
                target = root / f"client-{cid}"
                setup.model.save_pretrained(str(target), selected_adapters=["default", *extra])
                save_token_gates(setup.model, target)  # peft does not save a gate: token_gate.safetensors
                _write_client_scales(target, engine, extra)
                describe_saved_adapter(target, setup.config.model, labels)
        finally:
            slots.reset_scales()
        replace_dir(root, run_dir.path / "personal")
    run_dir.plot()


def _write_client_scales(target: Path, engine: LocalEngine, extra: list[str]) -> None:
    """Make each saved adapter's ``lora_alpha`` give the scale the client used (its rank's scale times the weight
    its adapter has at inference), so that peft rebuilds exactly the client's model. The factors are saved at the
    global rank, zero-padded, which changes nothing."""
    for ns in ["", *extra]:
        cfg_path = (target / ns / "adapter_config.json") if ns else (target / "adapter_config.json")
        cfg = json.loads(cfg_path.read_text())
        r = int(cfg["r"])
        scales = {
            round(layer.scaling[adapter], 12)
            for name, (layer, adapter) in engine.slots.layers.items()
            if adapter == (ns or "default")
        }
        if len(scales) != 1:
            continue  # modules with different scales keep peft's own alpha (not produced by fedlora's rules)
        scale = scales.pop()
        cfg["lora_alpha"] = scale * (r**0.5 if cfg.get("use_rslora") else r)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def load_trained(
    run_dir: str | Path, adapter: str = "adapter", *, client: int | None = None
) -> tuple[torch.nn.Module, Any]:
    """The trained model of a finished run: base model (+ the base-weight change, if the method made one) + its
    adapter(s), in eval mode, with the run's label names in ``model.config.id2label``. Returns ``(model, tokenizer)``.

    ``adapter`` is ``"adapter"`` (the global model) or ``"personal/client-K"`` (client K's own model, for methods
    with per-client state); ``client=K`` is the same as ``adapter="personal/client-K"``. The base model is the one
    the run's ``config.json`` names (the embedded default model loads offline). RunDirError when the run has no
    such model (e.g. FedSA-LoRA has no global adapter), the client does not exist, or the run has not finished.
    """
    from fedlora.export import attach_adapters, build_base, open_trained
    from fedlora.models import load_tokenizer

    trained = open_trained(run_dir, adapter, client=client)
    model = attach_adapters(build_base(trained), trained)
    return model, load_tokenizer(trained.config.model)


def headline_keys(task: str) -> list[str]:
    """The metrics a progress line or a summary shows for ``task``: its headline metrics, global then personal."""
    from fedlora.tasks import TASKS

    names = TASKS[task].headline_metrics if task in TASKS else ("accuracy",)
    return [f"{scope}_{name}" for scope in ("global", "personal") for name in names]


class _Progress(LoopHooks):
    """A tqdm bar per round over its clients, with the running metrics; silent when progress is off."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.bar: Any = None
        self.losses: list[float] = []

    def start_round(self, rnd: int, clients: list[int]) -> None:
        """``rnd`` is 1-based, as everywhere a round is shown."""
        n_clients = len(clients)
        self.losses = []
        if self.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_clients, desc=f"round {rnd}/{self.cfg.rounds}", unit="client", leave=True)

    def client_done(self, update: Any) -> None:
        self.losses.append(float(update.metrics.get("train_loss", float("nan"))))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(train_loss=f"{sum(self.losses) / len(self.losses):.4f}")

    def initial(self, metrics: dict[str, float]) -> None:
        """The model before the first round: its headline metrics and losses, one line."""
        wanted = dict.fromkeys(("global_loss", "personal_loss", *headline_keys(self.cfg.task)))
        keys = [k for k in wanted if k in metrics]
        if keys:
            shown = ", ".join(f"{k.replace('_accuracy', '_acc')}={metrics[k]:.4f}" for k in keys)
            log.info("before training: %s", shown)

    def end_round(self, report: RoundReport) -> None:
        shown = {"train_loss": f"{report.train_loss:.4f}"}
        for key in headline_keys(self.cfg.task):
            if key in report.metrics:
                shown[key.replace("_accuracy", "_acc")] = f"{report.metrics[key]:.4f}"
        if report.rejected:
            shown["rejected"] = str(len(report.rejected))
        if self.bar is not None:
            self.bar.set_postfix(shown)
            self.bar.close()
            self.bar = None
        else:
            log.info("round %d: %s", report.round, ", ".join(f"{k}={v}" for k, v in shown.items()))
