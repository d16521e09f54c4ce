"""Typed bench configuration: defaults in the dataclass, per-task values in TOML, ``--set key=value`` on top."""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from adamnx.bench import registry

__all__ = ["BenchConfig", "ConfigError", "load_config", "recorded_sweep"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


@dataclass
class BenchConfig:
    task: str = "mnist1d"
    optimizers: list[str] = field(default_factory=lambda: list(registry.DEFAULT_OPTIMIZERS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 1000
    batch_size: int = 64
    eval_every: int = 50  # steps between evaluations on validation and test (and checkpoints)
    log_every: int = 10  # steps between update-norm and ‖Δv‖/‖v‖ measurements
    schedule: str = "paper"  # "paper": linear decay to 1% over the first 60% of steps, then constant; or "constant"
    lr: dict[str, float] = field(default_factory=dict)  # per optimizer, from the documented sweep
    weight_decay: float = -1.0  # < 0: each optimizer's own default
    hessian_iters: int = 20
    hessian_samples: int = 512
    device: str = "auto"  # "auto": CUDA when present, else CPU
    data_dir: str = ""
    model: str = "resnet18"  # CIFAR only: resnet18 | convnext
    convnext_depths: list[int] = field(default_factory=lambda: [2, 2, 4, 2])
    convnext_dims: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    drop_path: float = 0.1
    framework: str = "torch"  # "torch", "jax" (optax twins) or "both" side by side; jax/both: registry.JAX_TASKS
    threads: int = (
        1  # torch intra-op threads (benchmarks/results/threads: 1 is as fast and never stalls); 0: torch's default
    )
    quick: bool = False  # a --quick smoke run: its report draws no conclusions
    lm: dict[str, int] = field(default_factory=dict)  # charlm only: the GPT's shape, see adamnx.bench.lm.LMSettings
    sweep_lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])

    def validate(self) -> None:
        if self.task not in registry.TASK_NAMES:
            raise ConfigError(f"unknown task {self.task!r}; choose from {', '.join(registry.TASK_NAMES)}")
        unknown = [o for o in self.optimizers if o not in registry.DISPLAY_NAMES]
        if unknown:
            raise ConfigError(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(registry.DISPLAY_NAMES)}")
        if not self.optimizers:
            raise ConfigError("optimizers must name at least one optimizer, e.g. --set optimizers=[adamnx,adam]")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        for name in ("steps", "batch_size", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.hessian_iters < 0 or self.hessian_samples < 1:
            raise ConfigError("hessian_iters must be ≥ 0 and hessian_samples ≥ 1")
        if self.threads < 0:
            raise ConfigError(f"threads must be ≥ 0 (0: torch's default), got {self.threads}")
        if self.schedule not in ("paper", "constant"):
            raise ConfigError(f"schedule must be 'paper' or 'constant', got {self.schedule!r}")
        for name, lr in self.lr.items():
            if not lr > 0:
                raise ConfigError(f"lr.{name} must be > 0, got {lr}")
        at_adamnx_lr = (*registry.ABLATION_OPTIMIZERS, *registry.COMPACT_VARIANTS)
        missing = [o for o in self.optimizers if o not in self.lr and o not in at_adamnx_lr]
        if missing:
            raise ConfigError(f"no learning rate for {missing[0]!r}: set it with --set lr.{missing[0]}=VALUE")
        if self.framework not in (*registry.FRAMEWORKS, "both"):
            raise ConfigError(f"framework must be 'torch', 'jax' or 'both', got {self.framework!r}")
        if self.lm:
            from adamnx.bench.lm import lm_settings

            try:
                lm_settings(self.lm)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.framework != "torch":
            if self.task not in registry.JAX_TASKS:
                raise ConfigError(f"--framework {self.framework} runs the {', '.join(registry.JAX_TASKS)} tasks only")
            no_twin = [o for o in self.optimizers if o not in registry.JAX_OPTIMIZERS]
            if no_twin:
                raise ConfigError(f"no JAX twin for {no_twin[0]!r}; JAX runs: {', '.join(registry.JAX_OPTIMIZERS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def frameworks(self) -> list[str]:
        return list(registry.FRAMEWORKS) if self.framework == "both" else [self.framework]

    def runs(self) -> list[tuple[str, str]]:
        """The report's rows: (optimizer, framework), torch rows first."""
        return [(o, f) for f in self.frameworks() for o in self.optimizers]

    def lr_for(self, optimizer: str) -> float:
        # The ablation's rules and the compact-state variants run at AdamNX's learning rate: only the β̂2 rule (or the
        # moments' storage) changes.
        return self.lr[optimizer] if optimizer in self.lr else self.lr["adamnx"]


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(BenchConfig)


def _check_type(key: str, value: Any, expected: Any) -> Any:
    origin = typing.get_origin(expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        (item,) = typing.get_args(expected)
        if not isinstance(value, list):
            example = ",".join(map(str, getattr(BenchConfig(), key.split("[")[0], []) or ["..."]))
            raise ConfigError(f"{key} must be a list of {item.__name__}, e.g. --set {key}=[{example}]; got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        _, item = typing.get_args(expected)
        return {k: _check_type(f"{key}.{k}", v, item) for k, v in value.items()}
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _parse_value(text: str) -> Any:
    """A TOML value; a bare word is a string, and ``[a, b]`` a list of them (``optimizers=[adamnx,adam]``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.startswith("[") and text.endswith("]"):
            return [_parse_value(item.strip()) for item in text[1:-1].split(",") if item.strip()]
        return text


def _apply(cfg: BenchConfig, values: dict[str, Any], source: str) -> None:
    types = _field_types()
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"unknown config key {key!r} in {source}; valid keys: {', '.join(types)}")
        current = getattr(cfg, key)
        checked = _check_type(key, value, types[key])
        setattr(cfg, key, {**current, **checked} if isinstance(current, dict) else checked)


def task_defaults(task: str) -> dict[str, Any]:
    """The task's TOML; its learning rates come from the recorded sweep when the TOML names none."""
    path = resources.files("adamnx.bench") / "configs" / f"{task}.toml"
    values = tomllib.loads(path.read_text()) if path.is_file() else {}
    sweep = recorded_sweep(task)
    if sweep is not None and "lr" not in values:
        values["lr"] = dict(sweep["chosen_lr"])
        values.setdefault("sweep_lrs", [float(lr) for lr in sweep["grid"]])
    return values


def recorded_sweep(task: str) -> dict[str, Any] | None:
    """The shipped learning-rate sweep of ``task`` (src/adamnx/bench/sweeps/TASK.json), or None."""
    import json

    path = resources.files("adamnx.bench") / "sweeps" / f"{task}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_config(task: str, overrides: list[str] = (), quick: bool = False, ablation: bool = False) -> BenchConfig:
    """Defaults ← the task's TOML ← its [quick] table (with ``quick``) ← ``--set key=value`` overrides."""
    if task not in registry.TASK_NAMES:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(registry.TASK_NAMES)}")
    cfg = BenchConfig(task=task)
    values = task_defaults(task)
    quick_values = values.pop("quick", {})
    _apply(cfg, values, f"{task}.toml")
    if quick:
        _apply(cfg, {**quick_values, "quick": True}, f"{task}.toml [quick]")
    if ablation:
        cfg.optimizers = list(registry.ABLATION_OPTIMIZERS)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text.strip())
        if "." in key:  # a table entry: lr.adamnx=1e-3
            table, sub = key.split(".", 1)
            _apply(cfg, {table: {sub: value}}, "--set")
        else:
            _apply(cfg, {key: value}, "--set")
    cfg.validate()
    return cfg


def to_dict(cfg: BenchConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> BenchConfig:
    cfg = BenchConfig()
    _apply(cfg, values, "config.json")
    cfg.validate()
    return cfg
