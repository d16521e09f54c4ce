"""The harness: CLI end to end, config and errors, AdaX's closed form, the Hessian probe, CIFAR files, resume."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import struct

import numpy as np
import pytest
import torch

# find_spec, not importorskip: the check imports nothing (mnist1d would pull in scipy and matplotlib, ~1 s that
# every collection pays, `-m "not slow"` included); the tests import what they use
if importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("mnist1d") is None:
    pytest.skip("needs matplotlib and mnist1d (the bench extra)", allow_module_level=True)

from adamnx.bench.config import ConfigError, load_config
from adamnx.bench.harness import run_bench
from adamnx.bench.hessian import top_hessian_eigenvalue
from adamnx.bench.optimizers import OPTIMIZERS, DecayRuleAdam, adaxw
from adamnx.bench.registry import COMPACT_VARIANTS, DISPLAY_NAMES
from adamnx.bench.runner import BenchInterrupted
from adamnx.bench.tasks import hsv_flip_augment, paper_lr_lambda, read_cifar
from adamnx.cli import main


def _is_png(path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100


pytestmark = pytest.mark.usefixtures("in_tmp_path")  # tests/conftest.py: nothing lands in the repository


def test_cli_quick_end_to_end(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for task in ("mnist1d", "digits", "quadratic"):
        run = tmp_path / task
        report = (run / "report.md").read_text()
        for name, shown in DISPLAY_NAMES.items():
            if not name.startswith("rule-") and name not in COMPACT_VARIANTS:  # those run when asked for
                assert f"| {shown} |" in report
                assert (run / "runs" / f"{name}-seed0.json").exists()
        assert "Smoke run: too short for conclusions" in report and "ties" not in report and "beats" not in report
        for plot in ("curves.png", "beta2_hat.png", "stability.png"):
            assert _is_png(run / plot), plot
            assert f"]({plot})]({plot})" in report, plot  # shown inline, linked to the full-size image
        config = json.loads((run / "config.json").read_text())
        assert config["task"] == task and config["seeds"] == [0, 1]
        env = json.loads((run / "environment.json").read_text())
        assert env["torch"] == torch.__version__
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert {json.loads(line)["optimizer"] for line in lines} == {"adamnx", "adam", "adamw", "adaxw", "sgdm"}
        assert "selected on the validation split" in report and "1 torch thread" in report
        assert env["torch threads"] == 1
        assert task in printed
    assert json.loads((tmp_path / "bench.json").read_text()) == {"tasks": ["mnist1d", "digits", "quadratic"]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--task", "imagenet"], "unknown task 'imagenet'; choose from mnist1d, digits"),
        (["bench", "--set", "optimizers=['adamnx','lion']"], "unknown optimizer 'lion'; choose from adamnx"),
        (["bench", "--set", "steps=ten"], "steps must be int"),
        (["bench", "--set", "steps=0"], "steps must be ≥ 1"),
        (["bench", "--set", "colour=blue"], "unknown config key 'colour'"),
        (["bench", "--set", "lr.adamnx=-1"], "lr.adamnx must be > 0"),
        (["bench", "--set", "nonsense"], "--set takes key=value"),
        (["bench", "--task", "cifar10"], "cifar10 needs --data-dir"),
        (["bench", "--task", "cifar10", "--data-dir", "/nonexistent/folder"], "is not a folder"),
        (["bench", "--task", "digits", "--framework", "jax"], "runs the mnist1d, charlm tasks only"),
        (["bench", "--resume", "/nonexistent"], "not a bench run folder"),
        (["bench", "--task", "digits", "--set", "device=cuda"], "CUDA is not available"),
        (["bench", "--task", "digits", "--set", "optimizers=adamnx"], "e.g. --set optimizers=[adamnx,adam,adamw"),
        (["bench", "--resume", ".", "--set", "steps=3"], "takes no --set"),
        (["bench", "--resume", ".", "--task", "digits", "--quick"], "takes no --task, --quick"),
        (["schedule", "--steps", "0"], "--steps must be positive"),
        (["perf", "--shapes", "round"], "bad perf arguments"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert list(tmp_path.iterdir()) == []  # a run that fails before training leaves no folder behind


def test_missing_cifar_files_say_how_to_provide_them(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert main(["bench", "--task", "cifar100", "--data-dir", str(tmp_path / "data")]) == 2
    assert "Download the python version of CIFAR100" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no run folder


def test_config_layers_and_types():
    cfg = load_config("digits", ["steps=7", "lr.adamnx=0.5", "seeds=[3, 4, 5]", "schedule=constant"], quick=True)
    assert (cfg.steps, cfg.lr["adamnx"], cfg.seeds, cfg.schedule) == (7, 0.5, [3, 4, 5], "constant")
    assert cfg.lr["adam"] > 0  # the TOML's other entries survive a partial --set of the table
    assert load_config("digits").seeds == [0, 1, 2]  # the default run has ≥ 3 seeds
    ablation = load_config("digits", ablation=True)
    assert ablation.optimizers == ["rule-adam", "rule-adax", "rule-adamnx", "rule-mean", "rule-adafactor"]
    assert ablation.lr_for("rule-adax") == ablation.lr["adamnx"]
    with pytest.raises(ConfigError, match="seeds must be a non-empty list"):
        load_config("digits", ["seeds=[]"])
    with pytest.raises(ConfigError, match=r"seeds\[0\] must be int"):
        load_config("digits", ["seeds=['a']"])


def test_schedule_command_prints_the_paper_values(capsys):
    assert main(["schedule", "--beta2", "0.99", "--steps", "10,100000"]) == 0
    out = capsys.readouterr().out
    assert "9.9955e-02" in out and "4.339" in out and "9,950 steps" in out
    assert main(["schedule", "--horizon", "9950"]) == 0
    assert "0.98999" in capsys.readouterr().out  # H(0.99) is 9,950.2, so 9,950 steps is a hair below 0.99


def test_adaxw_matches_its_closed_form():
    """AdaX (Li et al. 2020): v_t = (1+β2)v + β2 g², v̂ = v/((1+β2)^t − 1), m an EMA, θ −= η m/(√v̂+ε) + ηλθ."""
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=5)
    grads = rng.normal(size=(300, 5)) * rng.uniform(0.1, 3, size=(300, 1))
    lr, wd, b1, b2, eps = 5e-3, 5e-2, 0.9, 1e-4, 1e-12
    p = torch.tensor(theta0, requires_grad=True)
    opt = adaxw([p], lr=lr, weight_decay=wd)
    theta, m, v = theta0.copy(), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, start=1):
        p.grad = torch.tensor(g)
        opt.step()
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = (1 + b2) * v + b2 * g**2
        v_hat = v / ((1 + b2) ** t - 1)
        theta = theta - lr * m / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-10)


def test_decay_rule_adamnx_equals_the_optimizer():
    """The ablation's AdamNX rule is the real AdamNX (same m, v, ε, wd): only the rule is swapped."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    opt_a = DecayRuleAdam([a], lr=1e-2, rule="adamnx", weight_decay=0.01)
    opt_b = OPTIMIZERS["adamnx"].make([b], lr=1e-2)
    for _ in range(200):
        grad = torch.randn(6, dtype=torch.float64, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_hessian_power_iteration_finds_the_top_eigenvalue():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    eigenvalues = torch.cat([torch.tensor([7.5, 2.0], dtype=torch.float64), torch.rand(18, dtype=torch.float64)])
    a = q @ torch.diag(eigenvalues) @ q.T
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    top = top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x + x.sum(), [x], iters=200, tol=1e-12)
    assert top == pytest.approx(7.5, rel=1e-8)


def test_paper_schedule_decays_to_one_percent_over_60_percent_then_stays():
    f = paper_lr_lambda(1000)
    assert f(0) == 1.0 and f(300) == pytest.approx(1 - 0.99 * 0.5) and f(600) == pytest.approx(0.01)
    assert f(999) == pytest.approx(0.01)


def _write_cifar(folder, name: str, n_train: int, n_test: int, classes: int, seed: int = 0):
    """Tiny files in CIFAR's python-pickle format (latin1 byte keys, uint8 rows of 3072)."""
    rng = np.random.default_rng(seed)
    files = {
        "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], "test_batch"),
        "cifar100": (["train"], "test"),
    }[name]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for f, n in [(f, n_train // len(files[0])) for f in files[0]] + [(files[1], n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, fh)
        expected[f] = (data, labels)
    return expected


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reader_on_generated_files(tmp_path, name, classes):
    subdir = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    expected = _write_cifar(tmp_path / subdir, name, 50, 20, classes)
    x_train, y_train, x_test, y_test = read_cifar(tmp_path, name)  # the parent folder works too
    assert x_train.shape == (50, 3, 32, 32) and x_test.shape == (20, 3, 32, 32) and x_train.dtype == torch.uint8
    first_file = next(iter(expected))
    data, labels = expected[first_file]
    assert torch.equal(x_train[0], torch.tensor(data[0]).reshape(3, 32, 32))
    assert y_train[: len(labels)].tolist() == labels
    assert y_test.tolist() == expected[list(expected)[-1]][1]


def test_cifar_task_trains_on_tiny_files(tmp_path):
    _write_cifar(tmp_path / "data", "cifar10", 100, 20, 10)
    overrides = ["model=convnext", "batch_size=8", f'data_dir="{tmp_path / "data"}"', "optimizers=['adamnx','sgdm']"]
    cfg = load_config("cifar10", overrides, quick=True)
    summary = run_bench(cfg, tmp_path / "run", progress=False)
    assert [r["optimizer"] for r in summary["rows"]] == ["adamnx", "sgdm"]
    assert all(math.isfinite(r["test_mean"]) for r in summary["rows"])


def test_hsv_flip_augment_keeps_range_and_identity_when_idle():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = hsv_flip_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    # HSV round trip without jitter is the identity (to float rounding)
    from adamnx.bench.tasks import _hsv_to_rgb, _rgb_to_hsv

    rgb = x.float() / 255
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(rgb)), rgb, atol=1e-5, rtol=0)


def test_killed_bench_resumes_to_the_same_numbers(tmp_path):
    overrides = ["steps=60", "eval_every=20", "seeds=[0]", "optimizers=['adamnx','adam']", "hessian_iters=2"]
    straight = run_bench(load_config("digits", overrides), tmp_path / "straight", progress=False)
    killed = tmp_path / "killed"
    with pytest.raises(BenchInterrupted):
        run_bench(load_config("digits", overrides), killed, progress=False, stop_after_evals=1)
    assert (killed / "runs" / "adamnx-seed0.ckpt").exists()
    resumed = run_bench(load_config("digits", overrides), killed, resume=True, progress=False)

    def numbers(summary):  # NaN-aware comparison of everything but the wall time
        return json.dumps([{k: v for k, v in r.items() if k != "wall_time_s"} for r in summary["rows"]], sort_keys=True)

    assert numbers(resumed) == numbers(straight)
    a = json.loads((tmp_path / "straight" / "runs" / "adamnx-seed0.json").read_text())
    b = json.loads((killed / "runs" / "adamnx-seed0.json").read_text())
    assert a["evals"] == b["evals"] and a["logs"] == b["logs"]


def test_late_activation_stress_task_shows_the_hazard_and_the_mitigation(tmp_path):
    from adamnx.bench.stress import run_stress, write_outputs

    guarded = ["adamnx-forloop+guard", "adamnx-foreach+guard", "adamnx-fused+guard"]
    torch.set_num_threads(1)  # a tiny model: a second thread only spin-waits (the fixture restores the count)
    results = run_stress(steps=3_020, t_late=3_000, candidates=["adamnx-fused", *guarded, "adam"])
    nx, adam = results["adamnx-fused"]["max_rare_update_over_lr"], results["adam"]["max_rare_update_over_lr"]
    assert nx > 1.5 * adam  # AdamNX's cold rows jump further than Adam's (≈ 6× vs ≈ 3× lr at t = 3,000)
    for name in guarded:  # per-coordinate counts, in every implementation: the rare rows behave like a fresh run
        assert results[name]["max_rare_update_over_lr"] <= adam
        assert results[name]["median_step_ms"] > 0
    assert all(r["max_late_layer_update_over_lr"] <= 1.05 for r in results.values())  # own tensor: safe
    text = write_outputs(results, tmp_path, {"t_late": 3_000, "steps": 3_020})
    assert "adamnx-fused+guard" in text and "× without the guard" in text
    assert (tmp_path / "late_activation.png").exists()
    assert "](late_activation.png)](late_activation.png)" in text
