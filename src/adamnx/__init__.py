"""AdamNX: Adam whose second-moment decay rises to 1 (arXiv 2511.13465), for PyTorch and JAX."""

from adamnx import integrations  # torch only: `adamnx.integrations.param_groups` after a bare `import adamnx`
from adamnx.optimizer import AdamNX
from adamnx.schedule import Coefficients, beta2_for_horizon, coefficients, horizon

__all__ = ["AdamNX", "Coefficients", "beta2_for_horizon", "coefficients", "horizon", "integrations"]
__version__ = "0.1.0"
