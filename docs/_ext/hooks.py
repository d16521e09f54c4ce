"""MkDocs hooks: serve the recorded results under ``benchmarks/results/`` as ``results/...`` in the site, and MathJax
from the docs extra's copy (``django-static-mathjax``, a plain copy of MathJax 3), so that formulas render offline.

MkDocs only serves files under ``docs_dir``. Rather than copy the recorded reports and plots into ``docs/``
(they would drift from the originals), this adds every file under ``benchmarks/results/`` to the site's files
as it is: each ``.md`` report becomes a page (its relative links to its plots and data keep working), each
plot an image that ``docs/results.md`` embeds, and the raw data a download. Reports listed in mkdocs.yml's
``nav`` appear in the menu; a new one that is not is still built (and reachable from its links), without a
warning.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files, InclusionLevel

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
MATHJAX_URI = "javascripts/mathjax"  # mkdocs.yml's extra_javascript names javascripts/mathjax/tex-mml-chtml.js


def _mathjax_files() -> Path:
    """The folder of MathJax's es5 build (the combined component and the CHTML output's fonts), installed by the
    docs extra."""
    spec = importlib.util.find_spec("mathjax")
    folder = (
        None
        if spec is None or not spec.submodule_search_locations
        else Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    )
    if folder is None or not (folder / "tex-mml-chtml.js").is_file():
        raise PluginError(
            'the site renders its formulas with a local copy of MathJax: pip install -e ".[docs]" '
            "(django-static-mathjax provides it)"
        )
    return folder


def _nav_paths(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_paths(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(set(), *(_nav_paths(v) for v in nav))
    return set()


def on_files(files: Files, *, config, **kwargs) -> Files:
    if not RESULTS.is_dir():
        raise FileNotFoundError(f"{RESULTS} is missing: the Results pages are built from it")
    in_nav = _nav_paths(config["nav"] or [])
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file():
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            file = File.generated(config, uri, abs_src_path=str(path))
            if file.is_documentation_page() and uri not in in_nav:
                file.inclusion = InclusionLevel.NOT_IN_NAV
            files.append(file)
    mathjax = _mathjax_files()
    for path in sorted(mathjax.rglob("*")):  # the component loads its output and fonts from beside itself
        if path.is_file() and (path.name == "tex-mml-chtml.js" or "output" in path.relative_to(mathjax).parts):
            uri = f"{MATHJAX_URI}/" + path.relative_to(mathjax).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
