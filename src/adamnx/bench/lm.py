"""The ``charlm`` task's pieces: an offline byte-level corpus, its split, and a small GPT in plain torch.

Corpus: the topic texts of the Python documentation that CPython ships in its standard library
(``pydoc_data.topics``, what ``help("assert")`` prints: ≈ 466 kB of English technical prose), keys sorted, joined
by blank lines, as UTF-8 bytes. No download, on any machine with Python, but the text changes between Python
releases: :func:`corpus` returns its sha256, and the task warns when it is not the one our results were recorded
with (:data:`RECORDED_CORPUS`), since bits per byte on another text are not comparable.

Split: the byte stream is cut into contiguous blocks of :data:`BLOCK` bytes; of every 20 blocks the 19th is
validation and the 20th test, the rest train, so each split samples the whole corpus and no byte is in two
splits. Training windows never cross a held-out block; validation and test windows do not overlap.

Metric: bits per byte (cross-entropy in bits of each next byte given the bytes before it in its window), lower is
better; a model that predicts the uniform distribution scores log2(256) = 8.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

__all__ = [
    "BLOCK",
    "GPT",
    "RECORDED_CORPUS",
    "VOCAB",
    "Corpus",
    "LMSettings",
    "bits_per_byte",
    "corpus",
    "lm_settings",
    "split_blocks",
    "split_windows",
    "windows",
]

VOCAB = 256  # bytes
BLOCK = 4096  # bytes per split block
# The corpus our recorded results (benchmarks/results/charlm/) were trained on.
RECORDED_CORPUS = {
    "python": "3.11.7",
    "bytes": 466_273,
    "sha256": "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee",
}


@dataclass(frozen=True)
class Corpus:
    data: bytes
    sha256: str
    python: str

    @property
    def matches_recorded(self) -> bool:
        return self.sha256 == RECORDED_CORPUS["sha256"]


@functools.cache
def corpus() -> Corpus:
    """The Python documentation's topic texts (``pydoc_data.topics``), keys sorted, as UTF-8 bytes."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - every CPython ships it; some distributions strip it
        raise ImportError(
            "the charlm corpus is the standard library's pydoc_data.topics, which this Python lacks "
            "(some distributions package it separately, e.g. as python3-doc)"
        ) from exc
    data = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    return Corpus(data, hashlib.sha256(data).hexdigest(), platform.python_version())


def split_blocks(n: int, block: int = BLOCK, every: int = 20) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges [start, end) of each split: train as maximal runs of train blocks, val and test per block."""
    spans: dict[str, list[tuple[int, int]]] = {"train": [], "val": [], "test": []}
    start = 0
    for i in range(math.ceil(n / block)):
        lo, hi = i * block, min((i + 1) * block, n)
        kind = {every - 2: "val", every - 1: "test"}.get(i % every, "train")
        if kind != "train":
            if start < lo:
                spans["train"].append((start, lo))
            spans[kind].append((lo, hi))
            start = hi
    if start < n:
        spans["train"].append((start, n))
    return spans


def windows(data: Tensor, context: int, stride: int) -> tuple[Tensor, Tensor]:
    """Windows of ``context`` bytes starting every ``stride`` bytes, and their next-byte targets (uint8)."""
    if len(data) <= context:
        return torch.empty(0, context, dtype=torch.uint8), torch.empty(0, context, dtype=torch.uint8)
    chunks = data.unfold(0, context + 1, stride)
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


def split_windows(data: bytes, context: int, train_stride: int) -> dict[str, tuple[Tensor, Tensor]]:
    """(inputs, targets) of each split: train windows every ``train_stride`` bytes, held-out ones disjoint."""
    stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = {}
    for kind, spans in split_blocks(len(data)).items():
        stride = train_stride if kind == "train" else context
        parts = [windows(stream[lo:hi], context, stride) for lo, hi in spans] or [windows(stream[:0], context, 1)]
        out[kind] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return out


@dataclass(frozen=True)
class LMSettings:
    """The GPT's shape and the data windows (``--set lm.d_model=128`` etc.)."""

    context: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    tied: int = 1  # 1: the output head is the token embedding (weight tying); 0: a separate Linear
    train_stride: int = 8  # a training window starts every this many bytes

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < (0 if f.name == "tied" else 1):
                raise ValueError(f"lm.{f.name} must be ≥ 1, got {getattr(self, f.name)}")
        if self.d_model % self.heads:
            raise ValueError(f"lm.d_model ({self.d_model}) must be divisible by lm.heads ({self.heads})")
        if self.tied not in (0, 1):
            raise ValueError(f"lm.tied must be 0 or 1, got {self.tied}")


def lm_settings(values: dict[str, int]) -> LMSettings:
    """Settings from the config's ``lm`` table; unknown keys and bad values raise ValueError."""
    names = {f.name for f in fields(LMSettings)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown lm setting {unknown[0]!r}; valid: {', '.join(sorted(names))}")
    settings = LMSettings(**values)
    settings.validate()
    return settings


class _Block(nn.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Written out (not scaled_dot_product_attention): the Hessian probe differentiates it twice.
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-style decoder over bytes: token + position embedding, pre-LN causal blocks, final LN, a head.

    Input (batch, time) integer bytes (any integer dtype); output (batch, time, 256) logits of the next byte.
    Initialisation as GPT-2: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2·layers).
    """

    def __init__(self, settings: LMSettings = LMSettings()) -> None:
        super().__init__()
        s = settings
        self.context = s.context
        self.tok = nn.Embedding(VOCAB, s.d_model)
        self.pos = nn.Embedding(s.context, s.d_model)
        self.blocks = nn.ModuleList(_Block(s.d_model, s.heads) for _ in range(s.layers))
        self.ln = nn.LayerNorm(s.d_model)
        self.head = None if s.tied else nn.Linear(s.d_model, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:
                std = 0.02 / math.sqrt(2 * s.layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} bytes is longer than the model's context {self.context}")
        h = self.tok(x.long()) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        h = self.ln(h)
        return h @ self.tok.weight.T if self.head is None else self.head(h)


def next_byte_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats) of every next byte."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten().long())


def bits_per_byte(logits: Tensor, targets: Tensor) -> float:
    """Mean cross-entropy in bits of every next byte: the task's metric (lower is better)."""
    return next_byte_loss(logits, targets).item() / math.log(2)
