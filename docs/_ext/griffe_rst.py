"""Griffe extension: the reStructuredText in adamnx's docstrings, as Markdown for mkdocstrings.

The docstrings are written for ``help()`` and Sphinx-style readers, as torch's are: ``:func:`x```-style roles,
``:math:`...``` and ``.. math::`` for the formulas, and simple ``=====`` tables for the paper-notation maps.
mkdocstrings renders docstrings as Markdown, so before they are parsed this rewrites

- ``:func:`/:class:`/:meth:`/:mod:`/:attr:`/:exc:`/:data:`/:obj:``` roles into cross-references to the
  documented object (resolved in the docstring's own scope, as Python would); a name outside adamnx
  (``optax.adamw``, ``math``) becomes plain code, since the site has no other project's inventory;
- ``:math:`x``` into ``$x$`` and a ``.. math::`` block into ``$$ ... $$`` (pymdownx.arithmatex);
- simple tables into Markdown tables.

A cross-reference to an adamnx object that the site does not document fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_ROLE = re.compile(r":(func|class|meth|mod|attr|exc|data|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*$")
_TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _canonical(obj: Object, loader: Any, role: str, name: str) -> str | None:
    """The canonical path of ``name`` as seen from ``obj``'s scope; None outside adamnx's documented API."""
    collection = loader.modules_collection
    head, _, rest = name.partition(".")
    if role == "mod" or (head == "adamnx" and rest and _exists(collection, name)):
        path = name  # a full path (in adamnx.optax, ``adamnx.AdamNX`` is not the local function ``adamnx``)
    else:
        try:
            path = obj.resolve(head) + ("." + rest if rest else "")
        except Exception:  # griffe's NameResolutionError: not a name in this scope
            path = name if head == "adamnx" else ""
    if not path.startswith("adamnx") or any(part.startswith("_") for part in path.split(".")):
        return None  # another project's object, or a private one: the site documents neither
    try:
        return collection[path].canonical_path
    except Exception:  # not loaded: leave the path for autorefs to judge
        return path


def _exists(collection: Any, path: str) -> bool:
    try:
        collection[path]
    except Exception:
        return False
    return True


def _roles(text: str, obj: Object, loader: Any) -> str:
    def crossref(match: re.Match) -> str:
        role, short, name = match.group(1), match.group(2), match.group(3).strip()
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _canonical(obj, loader, role, name)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    text = _ROLE.sub(crossref, text)
    return _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        width = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        out += [f"{indent}$$", *(indent + b[width:] for b in body), f"{indent}$$", ""]
    return out


def _tables(lines: list[str]) -> list[str]:
    """Simple tables (border, header, border, rows, border) into Markdown tables; cells split at 2+ spaces."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not _TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        ncols = len(lines[i].split())
        borders = [i]
        j = i + 1
        while j < len(lines) and len(borders) < 3:
            if _TABLE_BORDER.match(lines[j]):
                borders.append(j)
            j += 1
        if len(borders) < 3:  # not a simple table after all
            out.append(lines[i])
            i += 1
            continue
        rows = [
            [cell.strip() for cell in re.split(r"\s{2,}", line.strip(), maxsplit=ncols - 1)]
            for line in lines[borders[0] + 1 : borders[2]]
            if line.strip() and not _TABLE_BORDER.match(line)
        ]
        rows = [row + [""] * (ncols - len(row)) for row in rows]
        out += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * ncols]
        out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        out.append("")
        i = borders[2] + 1
    return out


def rst_to_markdown(text: str, obj: Object, loader: Any) -> str:
    lines = _math_blocks(_tables(text.splitlines()))
    return _roles("\n".join(lines), obj, loader)


class RstToMarkdown(Extension):
    def on_object(self, *, obj: Object, loader: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, obj, loader)
