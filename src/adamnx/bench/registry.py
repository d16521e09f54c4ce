"""The bench's names: tasks, optimizers, frameworks and how the report spells them.

Imports nothing: the config checks names against these tables, and ``tasks``/``optimizers``/``jax_trainer``
hold the things the names stand for (tests/test_bench.py checks that the two sides agree).
"""

from __future__ import annotations

__all__ = [
    "ABLATION_OPTIMIZERS",
    "COMPACT_VARIANTS",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_TASKS",
    "DISPLAY_NAMES",
    "FRAMEWORKS",
    "JAX_OPTIMIZERS",
    "JAX_TASKS",
    "METRIC_LABELS",
    "REFERENCE",
    "TASK_DESCRIPTIONS",
    "TASK_NAMES",
    "display_name",
    "format_metric",
    "run_key",
]

# task → what it is (``adamnx bench --help`` lists them; tasks.py builds each)
TASK_DESCRIPTIONS = {
    "mnist1d": "MNIST-1D (generated locally by mnist1d), small 1-D CNN",
    "digits": "scikit-learn's bundled 8×8 digits, MLP",
    "quadratic": "noisy ill-conditioned least squares (condition number 1e3)",
    "charlm": "byte-level GPT on the Python documentation's topic texts (pydoc_data.topics, offline)",
    "cifar10": "CIFAR-10 from --data-dir (python pickles), authors' recipe",
    "cifar100": "CIFAR-100 from --data-dir (python pickles), authors' recipe",
}
TASK_NAMES = tuple(TASK_DESCRIPTIONS)

# a task's metric → how a progress line or a report names it, and how it writes a value
METRIC_LABELS = {"accuracy": "test accuracy %", "mse": "test MSE", "bpb": "test bits per byte"}
DEFAULT_TASKS = ("mnist1d", "digits", "quadratic")

# config id → the name tables, plots and sentences use
DISPLAY_NAMES = {
    "adamnx": "AdamNX",
    "adam": "Adam",
    "adamw": "AdamW",
    "adaxw": "AdaX-W",
    "sgdm": "SGD + momentum",
    "rule-adam": "Adam's rule",
    "rule-adax": "AdaX's rule",
    "rule-adamnx": "AdamNX's rule",
    "rule-mean": "1/t rule",
    "rule-adafactor": "Adafactor's rule",
    "adamnx-bf16": "AdamNX, bf16 state",
    "adamnx-8bit": "AdamNX8bit",
}
# AdamNX with compact state: run at AdamNX's learning rate, compared with it seed by seed (the same init and batches)
COMPACT_VARIANTS = ("adamnx-bf16", "adamnx-8bit")
DEFAULT_OPTIMIZERS = ("adamnx", "adam", "adamw", "adaxw", "sgdm")
ABLATION_OPTIMIZERS = ("rule-adam", "rule-adax", "rule-adamnx", "rule-mean", "rule-adafactor")
REFERENCE = ("adamnx", "rule-adamnx")  # the row every other row is compared with, whichever is in the run

FRAMEWORKS = ("torch", "jax")
JAX_OPTIMIZERS = DEFAULT_OPTIMIZERS  # optax twins exist for these
JAX_TASKS = ("mnist1d", "charlm")


def format_metric(metric: str, value: float) -> str:
    """``test accuracy 92.77%``, ``test MSE 0.2605``, ``test bits per byte 2.640``."""
    if metric == "accuracy":
        return f"test accuracy {100 * value:.2f}%"
    return f"{METRIC_LABELS.get(metric, f'test {metric}')} {value:.4g}"


def run_key(optimizer: str, framework: str) -> str:
    """The id of one optimizer's runs in file names and records: ``adamnx`` (torch) or ``adamnx-jax``."""
    return optimizer if framework == "torch" else f"{optimizer}-{framework}"


def display_name(optimizer: str, framework: str = "torch", frameworks: int = 1) -> str:
    """``AdamNX``; with several frameworks in one report, ``AdamNX (torch)`` / ``AdamNX (JAX)``."""
    name = DISPLAY_NAMES.get(optimizer, optimizer)
    if frameworks > 1:
        return f"{name} ({'JAX' if framework == 'jax' else framework})"
    return name
