"""The ``charlm`` task's GPT in JAX (``adamnx bench --task charlm --framework jax|both``).

The same architecture and initialisation scheme as :class:`adamnx.bench.lm.GPT` (pre-LN blocks, causal
attention, exact GELU, LayerNorm ε = 1e-5, N(0, 0.02) weights with residual projections scaled by 1/√(2·layers),
zero biases, tied head by default), written with ``jax.numpy``; parameters are a dict pytree. The draws differ
from torch's (another RNG), so a seed gives a different initialisation in each framework.
"""

from __future__ import annotations

import math
from typing import Any

from adamnx.bench.lm import VOCAB, LMSettings

__all__ = ["gpt_forward", "init_gpt", "next_byte_loss"]


def init_gpt(key: Any, s: LMSettings) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    d = s.d_model
    keys = iter(jax.random.split(key, 3 + 4 * s.layers))

    def normal(shape, std=0.02):
        return std * jax.random.normal(next(keys), shape)

    def linear(cin, cout, std=0.02):  # stored (in, out): y = x @ w + b
        return {"w": normal((cin, cout), std), "b": jnp.zeros(cout)}

    def norm():
        return {"g": jnp.ones(d), "b": jnp.zeros(d)}

    residual = 0.02 / math.sqrt(2 * s.layers)
    params: dict[str, Any] = {"tok": normal((VOCAB, d)), "pos": normal((s.context, d)), "ln": norm()}
    params["blocks"] = [
        {
            "ln1": norm(),
            "qkv": linear(d, 3 * d),
            "proj": linear(d, d, residual),
            "ln2": norm(),
            "fc": linear(d, 4 * d),
            "out": linear(4 * d, d, residual),
        }
        for _ in range(s.layers)
    ]
    if not s.tied:
        params["head"] = normal((d, VOCAB))
    return params


def _layer_norm(p, x, eps: float = 1e-5):
    import jax.numpy as jnp

    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["g"] + p["b"]


def gpt_forward(params: dict[str, Any], x: Any, heads: int) -> Any:
    """Logits (batch, time, 256) of the next byte for integer bytes ``x`` (batch, time)."""
    import jax
    import jax.numpy as jnp

    b, t = x.shape
    d = params["tok"].shape[1]
    h = params["tok"][x.astype(jnp.int32)] + params["pos"][:t]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    for blk in params["blocks"]:
        qkv = _layer_norm(blk["ln1"], h) @ blk["qkv"]["w"] + blk["qkv"]["b"]
        q, k, v = qkv.reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        scores = jnp.where(causal, q @ k.swapaxes(-1, -2) / math.sqrt(d // heads), -jnp.inf)
        att = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        h = h + att @ blk["proj"]["w"] + blk["proj"]["b"]
        mlp = jax.nn.gelu(_layer_norm(blk["ln2"], h) @ blk["fc"]["w"] + blk["fc"]["b"], approximate=False)
        h = h + mlp @ blk["out"]["w"] + blk["out"]["b"]
    h = _layer_norm(params["ln"], h)
    return h @ (params["tok"].T if "head" not in params else params["head"])


def next_byte_loss(logits: Any, targets: Any) -> Any:
    """Mean cross-entropy (nats) of every next byte; divide by ln 2 for bits per byte."""
    import jax.numpy as jnp
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32)).mean()
