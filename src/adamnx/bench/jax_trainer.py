"""The JAX side of a run (``adamnx bench --framework jax|both``): the MNIST-1D CNN in ``jax.lax`` or the charlm GPT
(``adamnx.bench.jax_models``), the optax twins.

Data order, evaluation schedule, selection, checkpoints and records are ``runner.train_one``'s, shared with the
torch side, so the two frameworks' rows in a report are comparable and a JAX run resumes like a torch run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adamnx.bench.optimizers import optimizer_spec
from adamnx.bench.tasks import Splits, Task

__all__ = ["JaxTrainer", "adaxw", "make_optimizer"]


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


def make_optimizer(name: str, schedule, weight_decay: float | None = None) -> tuple[Any, str]:
    """The optax twin of the torch optimizer ``name`` with the same hyperparameters, and its exact call."""
    import optax

    from adamnx.optax import adamnx

    kwargs = dict(optimizer_spec(name).kwargs)
    if weight_decay is not None and "weight_decay" in kwargs:
        kwargs["weight_decay"] = weight_decay
    b1, b2 = kwargs.get("betas", (None, None))
    wd = kwargs.get("weight_decay")
    twins = {
        "adamnx": (lambda: adamnx(schedule, b1=b1, b2=b2, weight_decay=wd), f"b1={b1}, b2={b2}, weight_decay={wd}"),
        "adam": (lambda: optax.adam(schedule, b1=b1, b2=b2), f"b1={b1}, b2={b2}"),
        "adamw": (lambda: optax.adamw(schedule, b1=b1, b2=b2, weight_decay=wd), f"b1={b1}, b2={b2}, weight_decay={wd}"),
        "adaxw": (lambda: adaxw(schedule, weight_decay=wd), f"weight_decay={wd}"),
        "sgdm": (lambda: optax.sgd(schedule, momentum=kwargs["momentum"]), f"momentum={kwargs.get('momentum')}"),
    }
    calls = {
        "adamnx": "adamnx.optax.adamnx",
        "adam": "optax.adam",
        "adamw": "optax.adamw",
        "adaxw": "adamnx.bench.jax_trainer.adaxw",
        "sgdm": "optax.sgd",
    }
    if name not in twins:
        raise ValueError(f"no JAX twin for optimizer {name!r}; JAX runs: {', '.join(twins)}")
    build, args = twins[name]
    return build(), f"{calls[name]}(schedule, {args})"


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


def _model(cfg: Any, task: Task):
    """(init(key), forward(params, x), loss(out, y), metric(out, y)) of the task's model in JAX."""
    import jax.numpy as jnp
    import optax

    if task.name == "charlm":
        from adamnx.bench.jax_models import gpt_forward, init_gpt, next_byte_loss
        from adamnx.bench.lm import lm_settings

        s = lm_settings(cfg.lm)
        return (
            lambda key: init_gpt(key, s),
            lambda p, x: gpt_forward(p, x, s.heads),
            next_byte_loss,
            lambda out, y: next_byte_loss(out, y) / math.log(2),
        )

    def cross_entropy(out, y):
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    return _init_cnn, _forward, cross_entropy, lambda out, y: (out.argmax(-1) == y).mean().astype(jnp.float32)


class JaxTrainer:
    """The task's JAX model with ``optimizer``'s optax twin; the same interface as ``TorchTrainer``."""

    def __init__(self, cfg: Any, task: Task, splits: Splits, optimizer: str, seed: int) -> None:
        import jax
        import optax

        self.task = task
        self.lr = cfg.lr_for(optimizer)
        decay_steps = max(1, math.floor(0.6 * cfg.steps))  # the torch side's paper_lr_lambda, in optax
        lr = self.lr
        self.schedule = (
            optax.linear_schedule(lr, lr * 0.01, decay_steps)
            if cfg.schedule == "paper"
            else optax.constant_schedule(lr)
        )
        wd = None if cfg.weight_decay < 0 else cfg.weight_decay
        tx, self.constructor = make_optimizer(optimizer, self.schedule, wd)
        init, forward, loss_of, metric_of = _model(cfg, task)
        self.params = init(jax.random.PRNGKey(seed))
        self.opt_state = tx.init(self.params)

        def loss_fn(p, x, y):
            return loss_of(forward(p, x), y)

        @jax.jit
        def train_step(p, s, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        @jax.jit
        def evaluate(p, x, y):
            out = forward(p, x)
            return loss_of(out, y), metric_of(out, y)

        self._loss_fn, self._train_step, self._evaluate = loss_fn, train_step, evaluate
        self.x_train, self.y_train = splits.x_train.numpy(), splits.y_train.numpy()
        self.data = {k: (getattr(splits, f"x_{k}").numpy(), getattr(splits, f"y_{k}").numpy()) for k in ("val", "test")}

    def train_step(self, idx: Tensor, step: int, measure: bool) -> tuple[float, dict[str, float] | None]:
        import jax
        import jax.numpy as jnp

        idx = idx.numpy()
        before = self.params
        self.params, self.opt_state, loss = self._train_step(
            self.params, self.opt_state, self.x_train[idx], self.y_train[idx]
        )
        if not measure:
            return float(loss), None
        delta = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), self.params, before)
        record = {"lr": float(self.schedule(step)), "update_norm": math.sqrt(float(sum(jax.tree.leaves(delta))))}
        return float(loss), record

    def evaluate(self, split: str) -> tuple[float, float]:
        loss, accuracy = self._evaluate(self.params, *self.data[split])
        return float(loss), float(accuracy)

    def hessian(self, iters: int, samples: int) -> float:
        n = min(samples, len(self.x_train))
        xh, yh = self.x_train[:n], self.y_train[:n]
        return _top_hessian_eigenvalue(lambda p: self._loss_fn(p, xh, yh), self.params, iters)

    def state_dict(self) -> dict[str, Any]:
        import jax

        leaves = jax.tree.leaves((self.params, self.opt_state))
        return {"leaves": [torch.from_numpy(np.array(leaf)) for leaf in leaves]}  # exact copies, any dtype

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import jax
        import jax.numpy as jnp

        treedef = jax.tree.structure((self.params, self.opt_state))
        leaves = [jnp.asarray(t.numpy()) for t in state["leaves"]]
        self.params, self.opt_state = jax.tree.unflatten(treedef, leaves)


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
