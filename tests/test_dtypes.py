"""Runs that train fine without gradwatch train with it: float64, sparse gradients, complex parameters, an
optimizer over a tensor outside the model, a per-sample loss vector. Each case is a real fit under the
Trainer and in a plain ``Watch`` loop, with the default remedies and with ``remedies="off"``; what can be
measured is checked against a per-parameter ``torch.linalg.vector_norm`` reference, and what cannot is
said in at most one log line per run."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import digits_loaders, trainer
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch
from gradwatch.probes import GradientProbe, ParamLayout, layer_of
from gradwatch.probes.activations import kind_of
from gradwatch.probes.gradients import foreach_norms, grouped_norms
from gradwatch.sinks.events import read_events

REMEDIES = [pytest.param({}, id="auto"), pytest.param({"remedies": "off"}, id="off")]
EPOCHS, BATCHES = 2, 15  # 30 optimizer steps a run
#: What a skip line says: at most one such line per run.
SKIPPED = "not measured"


def reference(model: nn.Module) -> tuple[float, dict[str, float]] | None:
    """The total and per-layer gradient norms from one ``vector_norm`` per parameter (sparse: densified)."""
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            sq[layer_of(name)] = sq.get(layer_of(name), 0.0) + float(torch.linalg.vector_norm(g)) ** 2
    if not sq:
        return None
    return math.sqrt(sum(sq.values())), {layer: math.sqrt(v) for layer, v in sq.items()}


def weight_norms(model: nn.Module) -> dict[str, float]:
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            sq[layer_of(name)] = (
                sq.get(layer_of(name), 0.0) + float(torch.linalg.vector_norm(p.detach())) ** 2
            )
    return {layer: math.sqrt(v) for layer, v in sq.items()}


def every_tenth(step: int) -> bool:
    """Reads at steps 9, 19 and 29: the last step of a run is read with the weight statistics."""
    return step % 10 == 9


class Reference(pl.Callback):
    """Listed before gradwatch: each step's reference gradient norms, before anything clips them."""

    def __init__(self) -> None:
        self.norms: dict[int, tuple[float, dict[str, float]]] = {}
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = reference(pl_module)
        if norms is not None:
            self.norms[trainer.global_step] = norms

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(out.detach().float().mean()))


def check_run(monitor, model, path, log, norms, loss: float, skipped: int) -> None:
    """The summary was written, the recorded numbers match the reference, ``skipped`` skip lines."""
    summary = read_events(path)[-1]
    assert summary["kind"] == "summary" and summary["status"] == "finished"
    assert summary["steps"] == EPOCHS * BATCHES
    assert summary["ranges"]["loss"]["last"] == pytest.approx(loss, rel=1e-5)
    last = monitor.last_stats
    assert last.step == EPOCHS * BATCHES - 1 and len(last.steps) == 10
    assert all(math.isfinite(r.loss) for r in last.steps)
    # every module the activation probe watches ran on the last (probed) step, but complex ones
    assert bool(last.activations) == any(kind_of(m) for m in model.modules())
    assert all(math.isfinite(a.mean) for a in last.activations.values())
    if norms:
        assert summary["ranges"]["grad_norm"]["last"] == pytest.approx(norms[last.step][0], rel=1e-5)
        for rec in last.steps:  # every step of the last read
            assert rec.grad_nonfinite == 0 and rec.grad_norm == pytest.approx(norms[rec.step][0], rel=1e-5)
        assert last.grad_norm == pytest.approx(norms[last.step][1], rel=1e-5)  # per layer
        assert last.weight_norm == pytest.approx(weight_norms(model), rel=1e-5)
        assert all(0 < r < 1 for r in last.update_ratio.values())
    else:  # nothing to measure: the norm of no gradient is 0, and no layer has weights
        assert summary["ranges"]["grad_norm"]["max"] == 0.0
        assert not last.grad_norm and not last.weight_norm and not last.update_ratio
    lines = [r.getMessage() for r in log.records if r.name == "gradwatch" and SKIPPED in r.getMessage()]
    assert len(lines) == skipped, lines
    log.clear()


def fit(tmp_path, model, data, opts, log, skipped, **kw) -> None:
    """A real Trainer fit with gradwatch (and the reference before it), checked."""
    ref = Reference()
    path = tmp_path / "fit.jsonl"
    monitor = gradwatch.HealthMonitor(
        print_summary=False, events_path=path, every_n_steps=every_tenth, **opts
    )
    pl_trainer = trainer(
        tmp_path, [ref, monitor], logger=False, max_epochs=EPOCHS, limit_train_batches=BATCHES, **kw
    )
    pl_trainer.fit(model, data)
    check_run(monitor.monitor, model, path, log, ref.norms, ref.losses[-1], skipped)


def watch_loop(tmp_path, model, optimizer, data, loss_of, opts, log, skipped) -> None:
    """The plain loop a user writes, with ``watch.step(loss)`` for ``optimizer.step()``, checked."""
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    path = tmp_path / "watch.jsonl"
    watch = gradwatch.Watch(
        model, optimizer, print_summary=False, events_path=path, every_n_steps=every_tenth, **opts
    )
    norms = {}
    for epoch in range(EPOCHS):
        for batch in list(data)[:BATCHES]:
            for opt in optimizers:
                opt.zero_grad()
            loss, reported = loss_of(batch)
            loss.backward()
            step_norms = reference(model)
            if step_norms is not None:
                norms[watch.global_step] = step_norms
            watch.step(reported, epoch=epoch)
    watch.close()
    check_run(watch.monitor, model, path, log, norms, float(reported.detach().float().mean()), skipped)


def test_grouped_norms_match_vector_norm():
    sparse = torch.sparse_coo_tensor(
        [[0, 2, 0]], [1.0, -2.0, 3.0], (4,), check_invariants=True
    )  # index 0 twice, uncoalesced
    tensors = [
        torch.randn(3, 4),
        torch.randn(5).bfloat16(),
        torch.randn(2, 2, dtype=torch.float64),
        torch.randn(3, dtype=torch.complex64),
        torch.randn(2, dtype=torch.complex128),
        sparse,
    ]
    with pytest.raises(RuntimeError, match="without narrowing"):  # the fused float32 kernel: float32/16 only
        foreach_norms(tensors)
    norms = grouped_norms(tensors)
    wide = [t.to_dense() if t.is_sparse else t for t in tensors]
    wide = [t.to(torch.complex128) if t.is_complex() else t.double() for t in wide]
    assert norms.dtype == torch.float64  # bfloat16 in float32, as the fused kernel takes it
    assert torch.allclose(norms, torch.stack([torch.linalg.vector_norm(t) for t in wide]), rtol=1e-6)
    assert float(norms[-1]) == pytest.approx(math.sqrt(4.0**2 + 2.0**2))

    # the probe keeps the one fused kernel for dense float32 gradients, and groups from a sparse one on
    dense, emb = nn.Linear(4, 2), nn.Embedding(6, 2, sparse=True)
    for module, grouped in ((dense, False), (emb, True)):
        probe = GradientProbe(ParamLayout(module))
        module(torch.randn(3, 4) if module is dense else torch.tensor([1, 1, 2])).sum().backward()
        norms, _, _, _ = probe.measure_raw(list(module.parameters()), per_layer=False)
        assert probe.grouped is grouped and norms.dtype == torch.float32
        reference = [torch.linalg.vector_norm(p.grad.to_dense()) for p in module.parameters()]
        assert torch.allclose(norms, torch.stack(reference))


# ------------------------------------------------------------------------------------------- float64
def diabetes(dtype=torch.float64, batch_size=24) -> DataLoader:
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=dtype) * 20  # features are scaled to unit norm per column: ~unit scale
    y = torch.tensor((y - y.mean()) / y.std(), dtype=dtype).unsqueeze(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def loss_of(self, batch):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        return loss, loss

    def training_step(self, batch, batch_idx):
        return self.loss_of(batch)[0]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("opts", REMEDIES)
def test_float64(tmp_path, opts, gw_log):
    model = Regressor()
    fit(tmp_path / "fit", model, diabetes(), opts, gw_log, skipped=0, precision="64-true")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model = Regressor().double()
    opt = model.configure_optimizers()
    watch_loop(tmp_path, model, opt, diabetes(), model.loss_of, opts, gw_log, skipped=0)


# -------------------------------------------------------------------------------------- sparse grads
TOKENS = 64 * 17  # one token per (pixel, value 0..16)


def digit_tokens(batch):
    x, y = batch
    return (x * 16).round().long() + torch.arange(64) * 17, y


class BagOfPixels(pl.LightningModule):
    """Digits as bags of (pixel, value) tokens: an all-embedding classifier with sparse gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(TOKENS, 10, mode="sum", sparse=True)

    def training_step(self, batch, batch_idx):
        tokens, y = digit_tokens(batch)
        return F.cross_entropy(self.bag(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SparseAdam(self.parameters(), lr=0.01)


class EmbedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(TOKENS, 16, sparse=True)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(16, 10))

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


@pytest.mark.parametrize("opts", REMEDIES)
def test_sparse_gradients(tmp_path, opts, gw_log):
    model = BagOfPixels()
    fit(tmp_path / "fit", model, digits_loaders()[0], opts, gw_log, skipped=0)
    model = EmbedHead()
    opts_ = [
        torch.optim.SparseAdam(model.emb.parameters(), lr=0.01),
        torch.optim.Adam(model.head.parameters()),
    ]

    def loss_of(batch):
        tokens, y = digit_tokens(batch)
        loss = F.cross_entropy(model(tokens), y)
        return loss, loss

    data = digits_loaders()[0]
    watch_loop(tmp_path, model, opts_, data, loss_of, opts, gw_log, skipped=0)


# -------------------------------------------------------------------------------------------- complex
class ComplexNet(pl.LightningModule):
    """A complex64 linear layer whose output's magnitude feeds a real classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.spectral = nn.Linear(64, 32, dtype=torch.complex64)
        self.phase = nn.Parameter(torch.randn(64, dtype=torch.complex64) * 0.1)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        z = self.spectral(x.to(torch.complex64) * (1 + self.phase))
        return self.head(z.abs())

    def loss_of(self, batch):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        return loss, loss

    def training_step(self, batch, batch_idx):
        return self.loss_of(batch)[0]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("opts", REMEDIES)
def test_complex_parameters(tmp_path, opts, gw_log):
    # the complex layer's output is the one thing not summarised (activation statistics are real)
    fit(tmp_path / "fit", ComplexNet(), digits_loaders()[0], opts, gw_log, skipped=1)
    model = ComplexNet()
    data = digits_loaders()[0]
    watch_loop(tmp_path, model, model.configure_optimizers(), data, model.loss_of, opts, gw_log, skipped=1)


# ------------------------------------------------------------------------- no trainable parameters
def frozen_classifier() -> nn.Module:
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return net.requires_grad_(False)


class Perturbation(pl.LightningModule):
    """A universal adversarial perturbation: a frozen classifier, the optimizer trains an input offset
    (a buffer that requires grad, not a parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = frozen_classifier()
        self.register_buffer("delta", torch.zeros(1, 64, requires_grad=True))

    def forward(self, x):
        return self.net(x + self.delta)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return F.cross_entropy(self(x), torch.zeros(len(x), dtype=torch.long))  # push every digit to 0

    def configure_optimizers(self):
        return torch.optim.Adam([self.delta], lr=0.05)


@pytest.mark.parametrize("opts", REMEDIES)
def test_no_trainable_parameters(tmp_path, opts, gw_log):
    model = Perturbation()
    fit(tmp_path / "fit", model, digits_loaders()[0], opts, gw_log, skipped=1)
    assert model.delta.abs().sum() > 0  # the perturbation trained

    net = frozen_classifier()
    x = torch.zeros(1, 64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)

    def loss_of(batch):
        images, _ = batch
        loss = F.cross_entropy(net(images + x), torch.zeros(len(images), dtype=torch.long))
        return loss, loss

    data = digits_loaders()[0]
    watch_loop(tmp_path, net, opt, data, loss_of, opts, gw_log, skipped=1)
    assert x.abs().sum() > 0


# -------------------------------------------------------------------------------- per-sample losses
class PerSample(pl.LightningModule):
    """Manual optimization: backward through the mean, return the per-sample loss vector."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def loss_of(self, batch):
        loss = F.cross_entropy(self(batch[0]), batch[1], reduction="none")
        return loss.mean(), loss

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        mean, loss = self.loss_of(batch)
        self.manual_backward(mean)
        opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("opts", REMEDIES)
def test_per_sample_loss(tmp_path, opts, gw_log):
    fit(tmp_path / "fit", PerSample(), digits_loaders()[0], opts, gw_log, skipped=0)
    model = PerSample()
    data = digits_loaders()[0]
    watch_loop(tmp_path, model, model.configure_optimizers(), data, model.loss_of, opts, gw_log, skipped=0)


class LazyNet(pl.LightningModule):
    """``nn.LazyLinear`` and ``nn.LazyBatchNorm1d``: no shapes, no buffers' values until the first forward.
    gradwatch's bind copied the buffers for skip_step and crashed ("uninitialized parameter")."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.LazyLinear(64), torch.nn.LazyBatchNorm1d(), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_lazy_modules_train_with_the_defaults(tmp_path):
    monitor = gradwatch.HealthMonitor(events_path=str(tmp_path / "events.jsonl"))
    trainer(tmp_path, [monitor], logger=False, max_epochs=1).fit(LazyNet(), digits_loaders()[0])
    assert monitor.summary["status"] == "finished" and monitor.summary["steps"] == 23
