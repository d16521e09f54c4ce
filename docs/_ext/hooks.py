"""MkDocs hook: serve the recorded results under ``benchmarks/results/`` as ``results/...`` in the site.

MkDocs only serves files under ``docs_dir``. Rather than copy the recorded reports and plots into ``docs/``
(they would drift from the originals), this adds every ``.md`` and ``.png`` under ``benchmarks/results/`` to
the site's files as they are: each report becomes a page (its relative links to its plots keep working) and
each plot an image that ``docs/results.md`` embeds. The raw data (``.json``, ``.jsonl``) stays in the
repository only.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SERVED = (".md", ".png")


def on_files(files: Files, *, config, **kwargs) -> Files:
    if not RESULTS.is_dir():
        raise FileNotFoundError(f"{RESULTS} is missing: the Results pages are built from it")
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in SERVED:
            uri = "results/" + path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
