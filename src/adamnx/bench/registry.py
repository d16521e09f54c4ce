"""The bench's names: tasks, optimizers, frameworks and how the report spells them.

Imports nothing: the config checks names against these tables, and ``tasks``/``optimizers``/``jax_trainer``
hold the things the names stand for (tests/test_bench.py checks that the two sides agree).
"""

from __future__ import annotations

__all__ = [
    "ABLATION_OPTIMIZERS",
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_TASKS",
    "DISPLAY_NAMES",
    "FRAMEWORKS",
    "JAX_OPTIMIZERS",
    "JAX_TASKS",
    "REFERENCE",
    "TASK_NAMES",
    "display_name",
    "run_key",
]

TASK_NAMES = ("mnist1d", "digits", "quadratic", "charlm", "cifar10", "cifar100")
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
}
DEFAULT_OPTIMIZERS = ("adamnx", "adam", "adamw", "adaxw", "sgdm")
ABLATION_OPTIMIZERS = ("rule-adam", "rule-adax", "rule-adamnx", "rule-mean", "rule-adafactor")
REFERENCE = ("adamnx", "rule-adamnx")  # the row every other row is compared with, whichever is in the run

FRAMEWORKS = ("torch", "jax")
JAX_OPTIMIZERS = DEFAULT_OPTIMIZERS  # optax twins exist for these
JAX_TASKS = ("mnist1d", "charlm")


def run_key(optimizer: str, framework: str) -> str:
    """The id of one optimizer's runs in file names and records: ``adamnx`` (torch) or ``adamnx-jax``."""
    return optimizer if framework == "torch" else f"{optimizer}-{framework}"


def display_name(optimizer: str, framework: str = "torch", frameworks: int = 1) -> str:
    """``AdamNX``; with several frameworks in one report, ``AdamNX (torch)`` / ``AdamNX (JAX)``."""
    name = DISPLAY_NAMES.get(optimizer, optimizer)
    if frameworks > 1:
        return f"{name} ({'JAX' if framework == 'jax' else framework})"
    return name
