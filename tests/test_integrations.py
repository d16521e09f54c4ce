"""Trainers people use: Hugging Face transformers.Trainer and PyTorch Lightning, on tiny models built in code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamnx import AdamNX
from adamnx.integrations import param_groups


class TinyRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_param_groups_split_matrices_from_vectors():
    model = TinyRegressor()
    decay, no_decay = param_groups(model, 0.1)
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = AdamNX(param_groups(model, 0.1), lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def _manual(steps: int, lr: float, batch: int = 8):
    """The same training without any trainer: sequential batches of the same data."""
    model, data = TinyRegressor(), TinyDataset()
    opt = AdamNX(param_groups(model, 0.01), lr=lr)
    for step in range(steps):
        i = (step * batch) % len(data)
        loss = model(data.x[i : i + batch], data.y[i : i + batch])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("how", ["optimizer_cls_and_kwargs", "optimizers"])
def test_huggingface_trainer(tmp_path, how):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        dataloader_drop_last=True,
        seed=0,
        disable_tqdm=True,
    )
    model = TinyRegressor()
    if how == "optimizer_cls_and_kwargs":
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=TinyDataset(), optimizer_cls_and_kwargs=(AdamNX, {"lr": 1e-2})
        )
    else:
        opt = AdamNX(param_groups(model, 0.01), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TinyDataset(), optimizers=(opt, sched))
    data = TinyDataset()
    before = model(data.x, data.y)["loss"].item()
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps the optimizer
    assert isinstance(opt, AdamNX)
    assert {int(s["step"]) for s in opt.state.values()} == {12}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # Trainer's own split, or ours
    assert model(data.x, data.y)["loss"].item() < before


def test_lightning_closure_step_matches_a_plain_loop():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyRegressor()

        def training_step(self, batch, batch_idx):
            return self.model(batch["x"], batch["labels"])["loss"]

        def configure_optimizers(self):
            return AdamNX(param_groups(self.model, 0.01), lr=1e-2)

    module = Module()
    loader = torch.utils.data.DataLoader(TinyDataset(), batch_size=8, shuffle=False)
    trainer = lightning.Trainer(
        max_steps=12,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    expected = _manual(12, 1e-2)
    for p, q in zip(module.model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_the_readme_spelling_works_after_a_bare_import():
    """`import adamnx` then `adamnx.integrations.param_groups(...)`, in a fresh process (no earlier import)."""
    import subprocess
    import sys

    code = "import adamnx, torch; print(len(adamnx.integrations.param_groups(torch.nn.Linear(2, 2), 0.01)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr[-2000:]


def test_huggingface_trainer_weight_decay_overrides_adamnx_default(tmp_path):
    """What docs/scaling.md warns of: the Trainer puts its own `weight_decay` (0.0 unless set) on every group it
    builds, so AdamNX's default 0.01, and a `weight_decay` in the optimizer's kwargs, are not what runs."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    assert args.weight_decay == 0.0
    trainer = transformers.Trainer(
        model=TinyRegressor(), args=args, optimizer_cls_and_kwargs=(AdamNX, {"lr": 1e-2, "weight_decay": 0.01})
    )
    opt = trainer.create_optimizer()
    opt = getattr(opt, "optimizer", opt)
    assert isinstance(opt, AdamNX) and opt.defaults["weight_decay"] == 0.01
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]  # the Trainer's, not AdamNX's
