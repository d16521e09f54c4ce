"""AdamNX: Adam whose second-moment decay rises to 1 (arXiv 2511.13465), for PyTorch and JAX.

The public names load on first use (PEP 562): ``import adamnx`` itself imports neither torch nor JAX, so the
``adamnx`` command answers ``--help`` at once; ``adamnx.AdamNX`` or ``from adamnx import AdamNX`` imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adamnx import integrations
    from adamnx.adamnx8bit import AdamNX8bit
    from adamnx.optimizer import AdamNX
    from adamnx.release import GradientRelease, release_gradients
    from adamnx.schedule import Coefficients, beta2_for_horizon, coefficients, horizon

__all__ = [
    "AdamNX",
    "AdamNX8bit",
    "Coefficients",
    "GradientRelease",
    "beta2_for_horizon",
    "coefficients",
    "horizon",
    "integrations",
    "release_gradients",
]
__version__ = "0.1.0"

# public name → the module that defines it (None: the name is that submodule)
_WHERE = {
    "AdamNX": "adamnx.optimizer",
    "AdamNX8bit": "adamnx.adamnx8bit",
    "Coefficients": "adamnx.schedule",
    "GradientRelease": "adamnx.release",
    "beta2_for_horizon": "adamnx.schedule",
    "coefficients": "adamnx.schedule",
    "horizon": "adamnx.schedule",
    "integrations": None,
    "release_gradients": "adamnx.release",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'adamnx' has no attribute {name!r}")
    module = _WHERE[name]
    value = (
        importlib.import_module(f"adamnx.{name}") if module is None else getattr(importlib.import_module(module), name)
    )
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
