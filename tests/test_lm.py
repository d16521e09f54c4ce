"""The charlm task: the byte corpus and its split, the GPT (torch and JAX), bits per byte, a tiny run of each."""

from __future__ import annotations

import hashlib
import itertools
import math

import pytest
import torch

from adamnx.bench.config import ConfigError, load_config
from adamnx.bench.lm import (
    BLOCK,
    GPT,
    RECORDED_CORPUS,
    LMSettings,
    bits_per_byte,
    corpus,
    lm_settings,
    split_blocks,
    split_windows,
)
from adamnx.bench.tasks import get_task

TINY = LMSettings(context=12, d_model=16, layers=2, heads=2, tied=1, train_stride=4)
TINY_SET = ["lm.context=12", "lm.d_model=16", "lm.layers=1", "lm.heads=2", "lm.train_stride=64"]


@pytest.mark.parametrize("tied", [1, 0])
def test_gpt_shapes_and_head(tied):
    torch.manual_seed(0)
    model = GPT(LMSettings(**{**TINY.__dict__, "tied": tied}))
    x = torch.randint(0, 256, (3, 12), dtype=torch.uint8)
    assert model(x).shape == (3, 12, 256)
    assert model(x[:, :5]).shape == (3, 5, 256)
    assert (model.head is None) == bool(tied)
    with pytest.raises(ValueError, match="longer than the model's context 12"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 256, (2, 12))
    for j in (0, 5, 11):
        changed = x.clone()
        changed[:, j] = (changed[:, j] + 1) % 256
        a, b = model(x), model(changed)
        torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=0)  # earlier positions cannot see byte j
        assert not torch.allclose(a[:, j:], b[:, j:])  # byte j itself and later ones do


def test_bits_per_byte_of_a_uniform_and_of_a_certain_model():
    targets = torch.randint(0, 256, (4, 10))
    assert bits_per_byte(torch.zeros(4, 10, 256), targets) == pytest.approx(8.0, rel=1e-6)  # log2(256)
    certain = torch.nn.functional.one_hot(targets, 256).float() * 100
    assert bits_per_byte(certain, targets) == pytest.approx(0.0, abs=1e-6)
    # half the probability on the right byte, the rest spread uniformly: −log2(1/2) = 1 bit
    probs = torch.full((4, 10, 256), 0.5 / 255).scatter(-1, targets[..., None], 0.5)
    assert bits_per_byte(probs.log(), targets) == pytest.approx(1.0, rel=1e-5)
    task = get_task("charlm")
    assert task.metric(torch.zeros(4, 10, 256), targets) == pytest.approx(8.0, rel=1e-6)
    assert not task.higher_is_better and task.metric_name == "bpb"


def test_corpus_is_deterministic_and_its_hash_is_its_bytes():
    text = corpus()
    again = corpus.__wrapped__()  # rebuilt from the standard library, not the cache
    assert again.data == text.data and again.sha256 == text.sha256
    assert text.sha256 == hashlib.sha256(text.data).hexdigest()
    assert len(text.data) > 200_000
    if text.python == RECORDED_CORPUS["python"]:
        assert text.matches_recorded and len(text.data) == RECORDED_CORPUS["bytes"]


def test_split_blocks_cover_every_byte_once():
    n = 45 * BLOCK + 123
    spans = split_blocks(n)
    covered = sorted(span for kind in spans.values() for span in kind)
    assert covered[0][0] == 0 and covered[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # contiguous, no overlap, no gap
    assert [lo // BLOCK for lo, _ in spans["val"]] == [18, 38] and [lo // BLOCK for lo, _ in spans["test"]] == [19, 39]


def test_split_windows_are_disjoint():
    # Mark each byte with its split: a window that reached into another split would contain another mark.
    n = 42 * BLOCK
    marks = bytearray(n)
    for value, kind in ((1, "val"), (2, "test")):
        for lo, hi in split_blocks(n)[kind]:
            marks[lo:hi] = bytes([value]) * (hi - lo)
    parts = split_windows(bytes(marks), context=64, train_stride=8)
    for value, kind in ((0, "train"), (1, "val"), (2, "test")):
        x, y = parts[kind]
        assert len(x) > 0 and x.dtype == torch.uint8
        assert set(torch.cat([x.flatten(), y.flatten()]).tolist()) == {value}, kind
    x_val, _ = parts["val"]
    assert len(x_val) == 2 * (BLOCK // 65)  # non-overlapping windows of 64 + 1 bytes per held-out block


def test_targets_are_the_next_bytes():
    data = bytes(range(200)) * 30
    x, y = split_windows(data, context=16, train_stride=8)["train"]
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    assert ((y.long() - x.long()) % 200 == 1).all()


def test_lm_settings_are_checked():
    assert lm_settings({}) == LMSettings()
    with pytest.raises(ValueError, match="unknown lm setting 'width'"):
        lm_settings({"width": 3})
    with pytest.raises(ConfigError, match=r"divisible by lm\.heads"):
        load_config("charlm", ["lm.d_model=10", "lm.heads=3"])
    with pytest.raises(ConfigError, match=r"lm\.tied must be 0 or 1"):
        load_config("charlm", ["lm.tied=2"])


def _tiny_config(framework: str):
    return load_config(
        "charlm",
        [
            *TINY_SET,
            "steps=6",
            "eval_every=2",
            "log_every=2",
            "seeds=[0]",
            "hessian_iters=1",
            "hessian_samples=4",
            "optimizers=['adamnx', 'adamw']" if framework == "torch" else "optimizers=['adamnx']",
            f"framework='{framework}'",
        ],
    )


@pytest.mark.parametrize("framework", ["torch", "both"])
def test_tiny_charlm_run_selects_the_lowest_validation_bpb(framework, tmp_path):
    if framework == "both":
        pytest.importorskip("optax")
    from adamnx.bench.harness import run_bench

    cfg = _tiny_config(framework)
    summary = run_bench(cfg, tmp_path, progress=False)
    names = {(row["optimizer"], row["framework"]) for row in summary["rows"]}
    expected = (
        {("adamnx", "torch"), ("adamw", "torch")} if framework == "torch" else {("adamnx", "torch"), ("adamnx", "jax")}
    )
    assert names == expected
    assert summary["metric"] == "bpb" and summary["higher_is_better"] is False
    for path in (tmp_path / "runs").glob("*.json"):
        import json

        run = json.loads(path.read_text())
        vals = [e["val_metric"] for e in run["evals"]]
        assert run["best_val_metric"] == min(vals)  # lower is better
        assert 0 < run["test_at_best_val"] < 8.5  # bits per byte, near log2(256) = 8 after 6 steps
    assert "bits per byte" in (tmp_path / "report.md").read_text()


def test_jax_gpt_matches_torch_gpt_with_the_same_weights():
    pytest.importorskip("optax")
    import jax.numpy as jnp
    import numpy as np

    from adamnx.bench.jax_models import gpt_forward, init_gpt, next_byte_loss

    for tied in (1, 0):
        s = LMSettings(**{**TINY.__dict__, "tied": tied})
        torch.manual_seed(0)
        model = GPT(s).eval()
        for p in model.parameters():  # non-trivial LayerNorm and bias values too
            p.data.add_(0.05 * torch.randn_like(p))
        params = init_gpt(__import__("jax").random.PRNGKey(0), s)

        def t(a):
            return jnp.asarray(a.detach().numpy())

        params["tok"], params["pos"] = t(model.tok.weight), t(model.pos.weight)
        params["ln"] = {"g": t(model.ln.weight), "b": t(model.ln.bias)}
        for blk, torch_blk in zip(params["blocks"], model.blocks):
            for name in ("qkv", "proj", "fc", "out"):
                layer = getattr(torch_blk, name)
                blk[name] = {"w": t(layer.weight.T), "b": t(layer.bias)}
            for name in ("ln1", "ln2"):
                norm = getattr(torch_blk, name)
                blk[name] = {"g": t(norm.weight), "b": t(norm.bias)}
        if not tied:
            params["head"] = t(model.head.weight.T)
        x = torch.randint(0, 256, (3, 12))
        expected = model(x)
        got = gpt_forward(params, jnp.asarray(x.numpy()), s.heads)
        np.testing.assert_allclose(np.asarray(got), expected.detach().numpy(), rtol=1e-4, atol=1e-5)
        loss = float(next_byte_loss(got, jnp.asarray(x.numpy())))
        assert loss == pytest.approx(
            torch.nn.functional.cross_entropy(expected.flatten(0, 1), x.flatten()).item(), rel=1e-5
        )
        assert math.isfinite(loss)


def test_jax_gpt_is_causal_and_initialised_like_torch():
    pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adamnx.bench.jax_models import gpt_forward, init_gpt

    params = init_gpt(jax.random.PRNGKey(0), TINY)
    x = np.random.default_rng(0).integers(0, 256, (2, 12))
    changed = x.copy()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, b = gpt_forward(params, jnp.asarray(x), TINY.heads), gpt_forward(params, jnp.asarray(changed), TINY.heads)
    assert a.shape == (2, 12, 256)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    torch_model = GPT(TINY)
    assert sum(np.size(leaf) for leaf in jax.tree.leaves(params)) == sum(p.numel() for p in torch_model.parameters())
    assert float(jnp.std(params["tok"])) == pytest.approx(0.02, rel=0.1)
