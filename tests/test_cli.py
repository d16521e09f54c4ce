"""The `adamnx` command for a first-time user: help that lists what exists and its defaults without importing torch,
progress lines in each task's own metric, and commands that write to a run folder of their own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adamnx.bench.registry import TASK_NAMES, format_metric
from adamnx.cli import _parser, main


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["perf", "--help"], ["stress", "--help"]])
def test_help_needs_no_torch(argv):
    """--help answers before torch is imported (3-4 s of importing, for a line of help)."""
    code = f"import sys, adamnx.cli\ntry:\n    adamnx.cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
    code += "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_bench_help_lists_every_task_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for task in TASK_NAMES:
        assert f"\n  {task} " in text, task
    words = " ".join(text.split())
    assert "omit it (default: 1)" in words  # --nproc
    assert "charlm byte-level GPT" in words


def test_perf_and_stress_help_show_their_defaults():
    commands = _parser()._subparsers._group_actions[0].choices
    perf, stress = (" ".join(commands[name].format_help().split()) for name in ("perf", "stress"))
    assert "(default: 1e6,1e7,1e8)" in perf and "runs/<timestamp>-perf" in perf and "(default: None)" not in perf
    assert "(default: 20000)" in stress and "runs/<timestamp>-stress" in stress


@pytest.mark.parametrize(
    ("metric", "value", "text"),
    [("accuracy", 0.9277, "test accuracy 92.77%"), ("mse", 0.2605, "test MSE 0.2605"), ("bpb", 2.64, "test bits per byte 2.64")],
)  # fmt: skip
def test_progress_lines_name_each_tasks_metric(metric, value, text):
    from adamnx.bench.harness import _note
    from adamnx.bench.tasks import TASKS

    task = next(t for t in TASKS.values() if t.metric_name == metric)
    assert format_metric(metric, value) == text
    assert _note(task, {"diverged": False, "test_at_best_val": value}) == f", {text}"


def test_perf_writes_to_a_run_folder_of_its_own(in_tmp_path):
    argv = ["perf", "--sizes", "2e3", "--shapes", "large", "--reps", "1", "--candidates", "adamnx-forloop,adamw-fused"]
    assert main([*argv, "--memory-size", "0", "--no-compile-probe"]) == 0
    (folder,) = (in_tmp_path / "runs").iterdir()
    assert folder.name.endswith("-perf") and (folder / "step_speed.md").is_file()
    assert not (in_tmp_path / "benchmarks").exists()  # never the repository's recorded results
