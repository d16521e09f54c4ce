"""Every code example in README.md and docs/ works.

- ```python blocks run, each on its own (a fresh namespace: a reader copies one block, imports included), with a
  temporary folder as the working directory (so nothing is written into the repository). A block is left out only when the line right before it
  is ``<!-- not-run: the reason -->`` (for what needs several processes or CUDA); each such block is reported as
  a skipped test that gives the page, the line and the reason (``pytest -ra``), never silently.
- ```bash / ```console blocks: every ``adamnx ...`` (or ``python -m adamnx ...``) command is parsed by the
  CLI's own argparse parser, and a ``bench`` command's ``--set``/``--task`` values are checked by the harness's
  config loader; nothing is run.
- A fence in a language this file does not know (or none) fails, so that no example goes untested unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
NOT_CODE = {"bibtex", "text", "txt", "toml", "json", "yaml", "yml", "ini", "diff"}
NOT_RUN_MARKER = re.compile(r"^<!--\s*not-run:(.*?)-->$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        assert i < len(lines), f"{page}:{start + 1}: unclosed code fence"
        i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN_MARKER.match(previous)
        blocks.append(Block(page, start + 1, lang.lower(), "\n".join(body) + "\n", marker and marker.group(1).strip()))
    return blocks


BLOCKS = [block for path in PAGES for block in _blocks(path)]
PYTHON_PAGES = sorted({b.page for b in BLOCKS if b.lang in PYTHON})
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]


def test_pages_found():
    assert "README.md" in {b.page for b in BLOCKS}
    assert len(PAGES) > 5 and PYTHON_PAGES, "docs/ has no pages with Python examples: wrong folder?"


def test_every_block_has_a_known_language():
    unknown = [f"{b.page}:{b.line}: ```{b.lang}" for b in BLOCKS if b.lang not in PYTHON | SHELL | NOT_CODE]
    assert not unknown, "code blocks in a language test_docs.py neither runs nor parses: " + ", ".join(unknown)


NOT_RUN = [b for b in BLOCKS if b.not_run is not None]


def test_opted_out_blocks_are_explained():
    assert all(b.not_run for b in NOT_RUN), "a <!-- not-run: --> marker needs a reason"
    assert all(b.lang in PYTHON for b in NOT_RUN), "only Python blocks can be opted out"


@pytest.mark.parametrize("block", NOT_RUN, ids=[f"{b.page}:{b.line}" for b in NOT_RUN])
def test_opted_out_block(block):
    compile(block.code, f"{block.page}:{block.line}", "exec")  # it is still valid Python
    pytest.skip(f"not run: {block.page}:{block.line}: {block.not_run}")


def test_no_stray_markers():
    """A not-run marker must sit right before a code block (else it marks nothing, or the wrong thing)."""
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if NOT_RUN_MARKER.match(line.strip()):
                following = next((x.strip() for x in lines[n + 1 :] if x.strip()), "")
                assert following.startswith("```"), f"{path.name}:{n + 1}: a not-run marker before no code block"


RUN = [b for b in BLOCKS if b.lang in PYTHON and b.not_run is None]


@pytest.mark.parametrize("block", RUN, ids=[f"{b.page}:{b.line}" for b in RUN])
def test_python_examples_run_on_their_own(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example_" + re.sub(r"\W", "_", f"{block.page}_{block.line}")}
    code = compile(block.code, f"{block.page}:{block.line}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, namespace)


def _commands(block: Block) -> list[list[str]]:
    """The shell commands of a block, each as its words, split at ``&&``, ``||``, ``;`` and ``|``."""
    lines = block.code.splitlines()
    if block.lang == "console":  # only the prompt lines are commands; the rest is output
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in lexer:
            if token in {"&&", "||", ";", "|", "&"}:
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    return [c for c in commands if c]


def _adamnx_args(words: list[str]) -> list[str] | None:
    if words[0] == "adamnx":
        return words[1:]
    for n in range(len(words) - 1):
        if words[n] == "-m" and words[n + 1] == "adamnx":  # python -m adamnx ..., torchrun ... -m adamnx ...
            return words[n + 2 :]
    return None


CLI_COMMANDS = [
    pytest.param(args, id=f"{b.page}:{b.line}:{' '.join(args)[:60]}")
    for b in SHELL_BLOCKS
    for words in _commands(b)
    if (args := _adamnx_args(words)) is not None
]


def test_shell_examples_have_adamnx_commands():
    assert len(CLI_COMMANDS) >= 10, "the bash/console blocks should show the adamnx commands"


@pytest.mark.parametrize("args", CLI_COMMANDS)
def test_cli_examples_parse(args):
    from adamnx.cli import DEFAULT_TASKS, _parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = _parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`adamnx {' '.join(args)}` does not parse (exit {exc.code}): {err.getvalue()}")
    if parsed.command == "bench" and not parsed.resume:
        from adamnx.bench.config import load_config

        overrides = list(parsed.overrides)
        if parsed.data_dir:
            overrides.append(f'data_dir="{parsed.data_dir}"')
        if parsed.framework:
            overrides.append(f'framework="{parsed.framework}"')
        for task in parsed.task or DEFAULT_TASKS:
            load_config(task, overrides, quick=parsed.quick, ablation=parsed.ablation)  # raises ConfigError


# The modules whose public names (``__all__``) the API reference documents.
PUBLIC_MODULES = [
    "adamnx",
    "adamnx.schedule",
    "adamnx.functional",
    "adamnx.optax",
    "adamnx.reference",
    "adamnx.integrations",
]


def test_api_reference_covers_every_public_name():
    """docs/api.md renders each public module (its ``__all__``: mkdocs.yml's ``filters: public``) or the name."""
    import importlib
    import inspect

    targets = set(re.findall(r"^::: ([\w.]+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M))
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^\s*filters: public\s*$", config, re.M), "mkdocs.yml: the API pages render __all__"
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        assert module_name in targets, f"docs/api.md has no `::: {module_name}`"
        for name in module.__all__:
            obj = getattr(module, name)
            home = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", module_name)
            # adamnx itself is rendered without members: its names are documented where they are defined.
            if module_name == "adamnx" and f"adamnx.{name}" not in targets and home not in targets:
                missing.append(f"adamnx.{name}")
    assert not missing, f"public names missing from docs/api.md: {missing}"


def _check_site():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs" / "_ext" / "check_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_check_finds_scripts_and_fonts_from_another_host(tmp_path):
    """What .ci/run runs on the built site: a page that loads MathJax from a CDN, or a stylesheet that imports
    Google's fonts, is found; links to other sites and local scripts are not."""
    check = _check_site()
    (tmp_path / "index.html").write_text(
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
        '<script src="javascripts/mathjax/tex-mml-chtml.js"></script>'
        '<link rel="canonical" href="https://example.org/adamnx/">'
        '<a href="https://arxiv.org/abs/2511.13465">the paper</a>'
    )
    (tmp_path / "style.css").write_text("@import url('https://fonts.googleapis.com/css?family=Roboto');")
    found = check.external_fetches(tmp_path)
    assert found == [
        "index.html: https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js",
        "style.css: https://fonts.googleapis.com/css?family=Roboto",
    ]


def test_the_built_site_renders_its_formulas_offline(tmp_path):
    """The real site, built as .ci/run builds it: MathJax is its own copy, and nothing is fetched from elsewhere."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mathjax")
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "javascripts" / "mathjax" / "tex-mml-chtml.js").is_file()
    assert _check_site().external_fetches(tmp_path / "site") == []
    # A flag in the implementations table (`foreach=False`) is not broken mid-word: the page loads our stylesheet,
    # which keeps code in table cells on one line.
    page = (tmp_path / "site" / "implementations" / "index.html").read_text(encoding="utf-8")
    assert "<td><code>foreach=False</code></td>" in page and "stylesheets/extra.css" in page
    css = (tmp_path / "site" / "stylesheets" / "extra.css").read_text()
    assert re.search(r"td code[^{]*\{[^}]*white-space:\s*nowrap", css)


RESULTS = ROOT / "benchmarks" / "results"
IMAGE = re.compile(r"(\[)?!\[[^\]]*\]\(([^)\s]+\.png)\)(\]\(([^)\s]+)\))?")


def _images(text: str) -> list[tuple[str, str | None]]:
    """Each image of a page: its path, and the link around it (None when it is not linked)."""
    return [(m.group(2), m.group(4) if m.group(1) else None) for m in IMAGE.finditer(text)]


def test_every_image_of_the_docs_links_to_its_full_size():
    for path in PAGES:
        for image, link in _images(path.read_text(encoding="utf-8")):
            assert link == image, f"{path.relative_to(ROOT)}: {image} is shown scaled down and not linked to itself"


@pytest.mark.parametrize("folder", sorted({p.parent for p in RESULTS.rglob("*.png")}), ids=lambda p: p.name)
def test_every_recorded_plot_is_shown_inline_beside_its_numbers(folder):
    shown = {image: link for md in folder.glob("*.md") for image, link in _images(md.read_text(encoding="utf-8"))}
    for plot in folder.glob("*.png"):
        assert shown.get(plot.name) == plot.name, (
            f"{plot.relative_to(ROOT)} is not shown inline and linked in its report"
        )
