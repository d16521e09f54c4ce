"""Every code example in README.md and docs/ works.

- ```python blocks run: each page's blocks in order, in one namespace, with a temporary folder as the working
  directory (so nothing is written into the repository). A block is left out only when the line right before it
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


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example_" + re.sub(r"\W", "_", page)}
    ran = 0
    for block in (b for b in BLOCKS if b.page == page and b.lang in PYTHON):
        if block.not_run is not None:
            continue  # reported by test_opted_out_block, with its reason
        code = compile(block.code, f"{page}:{block.line}", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)
        ran += 1
    if not ran:  # each opted-out block is reported by test_opted_out_block, with its reason
        pytest.skip(f"{page}: every Python block is opted out")


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
