"""Test-wide switches."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fused_kernel(request, monkeypatch):
    """Tests parametrized with impl="fused-inductor" run fused=True's accelerator (inductor) kernel on the CPU."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "fused-inductor" in (callspec.params.get("impl"), callspec.params.get("kernel")):
        import adamnx._fused

        monkeypatch.setattr(adamnx._fused, "INDUCTOR_ON_CPU", True)
