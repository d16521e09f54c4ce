"""The MNIST-1D task trained in JAX with the optax optimizers (``adamnx bench --framework jax|both``).

The model is the torch task's 1-D CNN written with ``jax.lax``; batches, splits, schedule, evaluation and
selection are the torch runner's, so the two frameworks' rows in a report are comparable.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from adamnx.bench.config import BenchConfig
from adamnx.bench.runner import _better, run_result
from adamnx.bench.tasks import Splits, Task

__all__ = ["JAX_OPTIMIZERS", "train_one_jax"]

JAX_OPTIMIZERS = {
    "adamnx": "adamnx.optax.adamnx(schedule, b1=0.9, b2=0.99, weight_decay=0.01)",
    "adam": "optax.adam(schedule, b1=0.9, b2=0.999)",
    "adamw": "optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.01)",
    "adaxw": "adamnx.bench.jax_runner.adaxw(schedule, weight_decay=0.05)",
    "sgdm": "optax.sgd(schedule, momentum=0.9)",
}


def adaxw(learning_rate, b1: float = 0.9, b2: float = 1e-4, eps: float = 1e-12, weight_decay: float = 0.05):
    """AdaX-W in optax: raw EMA m, v̂_t = v̂ β̂ + (1 − β̂) g² with 1 − β̂_t = β2/((1+β2)^t − 1), decoupled wd."""
    import jax
    import jax.numpy as jnp
    import optax

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (jnp.zeros([], jnp.int32), zeros, zeros)

    def update_fn(updates, state, params=None):
        count, mu, nu = state
        count = optax.safe_int32_increment(count)
        t = count.astype(jnp.result_type(float))
        w2 = b2 / jnp.expm1(t * jnp.log1p(b2))
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates)
        nu = jax.tree.map(lambda v, g: (1 - w2) * v + w2 * g * g, nu, updates)
        return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu), (count, mu, nu)

    return optax.chain(
        optax.GradientTransformation(init_fn, update_fn),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _make_optimizer(name: str, schedule):
    import optax

    from adamnx.optax import adamnx

    builders = {
        "adamnx": lambda: adamnx(schedule, b1=0.9, b2=0.99, weight_decay=0.01),
        "adam": lambda: optax.adam(schedule, b1=0.9, b2=0.999),
        "adamw": lambda: optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.01),
        "adaxw": lambda: adaxw(schedule, weight_decay=0.05),
        "sgdm": lambda: optax.sgd(schedule, momentum=0.9),
    }
    if name not in builders:
        raise ValueError(f"no JAX twin for optimizer {name!r}; JAX runs: {', '.join(builders)}")
    return builders[name]()


def _init_cnn(key, channels: int = 32, classes: int = 10, length: int = 40):
    import jax

    def conv(key, cin, cout, k):
        bound = 1 / math.sqrt(cin * k)  # torch's default Conv1d/Linear initialisation range
        kw, kb = jax.random.split(key)
        return {
            "w": jax.random.uniform(kw, (cout, cin, k), minval=-bound, maxval=bound),
            "b": jax.random.uniform(kb, (cout,), minval=-bound, maxval=bound),
        }

    keys = jax.random.split(key, 4)
    features = channels * ((length + 3) // 4)
    bound = 1 / math.sqrt(features)
    kw, kb = jax.random.split(keys[3])
    return {
        "c1": conv(keys[0], 1, channels, 5),
        "c2": conv(keys[1], channels, channels, 3),
        "c3": conv(keys[2], channels, channels, 3),
        "head": {
            "w": jax.random.uniform(kw, (features, classes), minval=-bound, maxval=bound),
            "b": jax.random.uniform(kb, (classes,), minval=-bound, maxval=bound),
        },
    }


def _forward(params, x):
    import jax

    def conv(h, p, stride, pad):
        out = jax.lax.conv_general_dilated(h, p["w"], (stride,), [(pad, pad)], dimension_numbers=("NCH", "OIH", "NCH"))
        return jax.nn.relu(out + p["b"][None, :, None])

    h = x[:, None, :]
    h = conv(h, params["c1"], 1, 2)
    h = conv(h, params["c2"], 2, 1)
    h = conv(h, params["c3"], 2, 1)
    return h.reshape(h.shape[0], -1) @ params["head"]["w"] + params["head"]["b"]


def train_one_jax(
    cfg: BenchConfig,
    task: Task,
    splits: Splits,
    optimizer: str,
    seed: int,
    checkpoint=None,
    on_step=None,
    stop_after_evals=None,
) -> dict[str, Any]:
    """Train the MNIST-1D CNN in JAX with ``optimizer``'s optax twin (no mid-run checkpoints: runs are short)."""
    import jax
    import jax.numpy as jnp
    import optax

    base = optimizer.removesuffix("@jax")
    lr = cfg.lr_for(base)
    decay_steps = max(1, math.floor(0.6 * cfg.steps))  # the torch runner's paper_lr_lambda, in optax
    schedule = (
        optax.linear_schedule(lr, lr * 0.01, decay_steps) if cfg.schedule == "paper" else optax.constant_schedule(lr)
    )
    tx = _make_optimizer(base, schedule)
    params = _init_cnn(jax.random.PRNGKey(seed))
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(_forward(p, x), y).mean()

    @jax.jit
    def train_step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def evaluate(p, x, y):
        out = _forward(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), (out.argmax(-1) == y).mean()

    x_train, y_train = splits.x_train.numpy(), splits.y_train.numpy()
    data = {k: (getattr(splits, f"x_{k}").numpy(), getattr(splits, f"y_{k}").numpy()) for k in ("val", "test")}
    steps_per_epoch = max(1, len(x_train) // cfg.batch_size)
    evals, logs, best = [], [], None
    started = time.perf_counter()
    perm_epoch, perm = -1, None
    for step in range(cfg.steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:  # the torch runner's batch order
            perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
            perm_epoch = epoch
        idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        measure = (step + 1) % cfg.log_every == 0
        before = params
        params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
        if measure:
            delta = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), params, before)
            logs.append(
                {
                    "step": step + 1,
                    "train_loss": float(loss),
                    "lr": float(schedule(step)),
                    "update_norm": math.sqrt(float(sum(jax.tree.leaves(delta)))),
                }
            )
        if on_step is not None:
            on_step(step + 1)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            (val_loss, val_acc), (test_loss, test_acc) = (evaluate(params, *data[s]) for s in ("val", "test"))
            entry = {
                "step": step + 1,
                "train_loss": float(loss),
                "val_loss": float(val_loss),
                "val_metric": float(val_acc),
                "test_loss": float(test_loss),
                "test_metric": float(test_acc),
            }
            evals.append(entry)
            if _better(task, entry, best):
                best = entry

    hessian = float("nan")
    if cfg.hessian_iters > 0:
        n = min(cfg.hessian_samples, len(x_train))
        hessian = _top_hessian_eigenvalue(lambda p: loss_fn(p, x_train[:n], y_train[:n]), params, cfg.hessian_iters)
    diverged = not math.isfinite(float(loss))
    return run_result(task, optimizer, seed, lr, JAX_OPTIMIZERS[base], diverged, best, evals, logs, hessian, started)


def _top_hessian_eigenvalue(loss, params, iters: int) -> float:
    import jax
    import jax.numpy as jnp

    grad = jax.grad(loss)
    hvp = jax.jit(lambda v: jax.jvp(grad, (params,), (v,))[1])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    estimate = 0.0
    for _ in range(iters):
        inv_norm = 1 / jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(v)))
        v = jax.tree.map(lambda x, s=inv_norm: x * s, v)
        hv = hvp(v)
        estimate = float(sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(v))))
        v = hv
    return estimate
