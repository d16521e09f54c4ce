"""How the bench's reports show a plot: inline, and linked to the full-size image (a report's page scales it down)."""

from __future__ import annotations

__all__ = ["figure"]


def figure(path: str, alt: str) -> str:
    """Markdown for a plot shown inline and linked to itself: ``[![alt](path)](path)``."""
    return f"[![{alt}]({path})]({path})"
