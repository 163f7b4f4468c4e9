"""Silent bugs (issue 16): no NaN, no crash, a ruined run. Each on a real fit, with the bug and without."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsMLP, digits_loaders, trainer
from programs import FrozenTable, GaussianNLL, MoonsGAN, Reinforce
from torch import nn

import gradwatch


def rules_of(monitor) -> set[str]:
    return {f.rule for f in monitor.findings if f.severity != "info"}


class PerBatchScheduler(DigitsMLP):
    """A schedule meant per epoch (cosine over 10 epochs) returned with ``"interval": "step"``: its LR
    reaches 0 after 10 batches, in the first epoch. ``interval="epoch"`` is the healthy twin."""

    def __init__(self, interval: str = "step") -> None:
        super().__init__()
        self.interval = interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


def test_a_per_epoch_schedule_stepped_per_batch_is_named_within_two_reads(tmp_path):
    pl.seed_everything(0)
    train, _ = digits_loaders()
    buggy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "buggy.jsonl"))
    trainer(tmp_path, [buggy], logger=False, max_epochs=2).fit(PerBatchScheduler("step"), train)
    (finding,) = [f for f in buggy.findings if f.rule == "lr_collapsed"]
    assert finding.step <= 10 + 2 * 20  # the LR is 0 at step 10; reads every 20 steps
    assert "interval" in finding.advice
    pl.seed_everything(0)
    healthy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "healthy.jsonl"))
    trainer(tmp_path, [healthy], logger=False, max_epochs=10).fit(PerBatchScheduler("epoch"), train)
    assert "lr_collapsed" not in rules_of(healthy)  # annealed to 0 at the end, with the loss learned


# ------------------------------------------------------------------ repeated_batch, gradients_not_cleared


def digits_loader(batch_size=64, shuffle=True, **kw) -> torch.utils.data.DataLoader:
    """The training digits of ``digits_loaders`` (1437), with another batch size, order, sampler or collate."""
    data = digits_loaders()[0].dataset
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g, **kw)


def repeating_loader() -> torch.utils.data.DataLoader:
    """A sampler that hands out the first batch's indices again and again, an epoch long (22 batches)."""
    return digits_loader(shuffle=False, sampler=list(range(64)) * 22)


def alarms(watched, rule: str) -> list:
    return [f for f in watched.findings if f.rule == rule and f.severity != "info"]


def plain_loop(
    loader, epochs, *, epoch_given=True, freeze_at=None, zero_grad=True, accumulate=1, assign=False, **kw
):
    """A user's loop under ``Watch``: forward, backward, ``watch.step``, ``zero_grad`` (or not), with
    ``accumulate`` micro-batches a step; ``freeze_at``: from that step on the loop reuses one batch;
    ``assign``: ``torch.autograd.grad`` and ``p.grad = g`` instead of ``backward`` (no zero_grad needed)."""
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = gradwatch.Watch(model, opt, print_summary=False, **{"remedies": "off", **kw})
    kept = None
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            if freeze_at is not None and watch.global_step >= freeze_at:
                kept = kept or (x, y)
                x, y = kept
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if assign:
                params = list(model.parameters())
                for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                    p.grad = g
            else:
                (loss / accumulate).backward()
            if (i + 1) % accumulate:
                continue
            watch.step(loss, epoch=epoch if epoch_given else None)
            if zero_grad:
                opt.zero_grad()
    watch.close()
    return watch


def test_a_loader_that_repeats_one_batch_is_named_within_two_reads(tmp_path):
    pl.seed_everything(0)
    buggy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "buggy.jsonl"))
    trainer(tmp_path, [buggy], logger=False, max_epochs=2).fit(DigitsMLP(), repeating_loader())
    (finding,) = alarms(buggy, "repeated_batch")
    assert finding.step <= 2 * 20 and "repeats one batch" in finding.message  # from step 0; reads every 20
    # healthy twins: shuffled; unshuffled with epochs of 20, 10 and 40 steps: every read (or every other)
    # sees the batch at the same position of an epoch as the read before it
    for batch_size, shuffle in ((64, True), (72, False), (144, False), (36, False)):
        healthy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / f"h{batch_size}.jsonl"))
        loader = digits_loader(batch_size, shuffle)
        trainer(tmp_path, [healthy], logger=False, max_epochs=4).fit(DigitsMLP(), loader)
        assert "repeated_batch" not in rules_of(healthy), (len(loader), [str(f) for f in healthy.findings])


def test_a_loader_that_repeats_one_sample_per_batch_is_named(tmp_path):
    def one_sample(items):  # a collate_fn that keeps the first sample B times
        return torch.utils.data.default_collate([items[0]] * len(items))

    buggy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "buggy.jsonl"))
    trainer(tmp_path, [buggy], logger=False, max_epochs=2).fit(
        DigitsMLP(), digits_loader(collate_fn=one_sample)
    )
    (finding,) = alarms(buggy, "repeated_batch")
    assert finding.step <= 2 * 20 and "repeats one sample" in finding.message


def test_a_plain_loop_that_repeats_a_batch_is_named_and_full_batch_training_is_not(tmp_path):
    assert alarms(plain_loop(repeating_loader(), 2), "repeated_batch")[0].step <= 2 * 20
    # without epoch=, a batch that stops changing at step 30 is named within two reads (at 60)
    frozen = plain_loop(digits_loader(), 3, epoch_given=False, freeze_at=30)
    assert 30 < alarms(frozen, "repeated_batch")[0].step <= 30 + 2 * 20
    # full-batch training (one batch of all 1437 digits) and an unshuffled loader whose epochs are read
    # at the same position, without epoch=: the same batch since the first read is an info finding
    full = plain_loop(digits_loader(batch_size=1437), 60, epoch_given=False)
    assert not alarms(full, "repeated_batch")
    assert [f.severity for f in full.findings if f.rule == "repeated_batch"] == ["info"]
    assert not alarms(plain_loop(digits_loader(72, shuffle=False), 4, epoch_given=False), "repeated_batch")
    assert not alarms(plain_loop(digits_loader(1437), 60, epoch_given=True), "repeated_batch")


def test_fingerprint_ignores_memory_layout_and_sample_order():
    from gradwatch.probes.fingerprint import fingerprint

    x, y = next(iter(digits_loader()))
    cpu = torch.device("cpu")
    order = torch.randperm(len(x))
    moved = torch.empty(len(x) + 1, x.shape[1])[1:]  # another alignment
    moved.copy_(x[order])
    assert torch.equal(fingerprint((x, y), cpu), fingerprint((moved, y[order].clone()), cpu))
    assert not torch.equal(fingerprint((x, y), cpu), fingerprint((x[1:], y[1:]), cpu))
    sparse = torch.eye(5).to_sparse()  # dicts, token ids and sparse tensors are fingerprinted, not crashed on
    assert fingerprint({"ids": torch.arange(6).reshape(2, 3), "adj": sparse}, cpu)[1].item() == 6


class ManualStep(DigitsMLP):
    """Manual optimization: ``opt.step()`` in training_step, with ``opt.zero_grad()`` or without."""

    def __init__(self, zero_grad: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.zero_grad_ = zero_grad

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.zero_grad_:
            opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


def test_a_plain_loop_without_zero_grad_is_named_at_the_first_read_after_step_0(tmp_path):
    buggy = plain_loop(digits_loader(), 2, zero_grad=False)
    (finding,) = alarms(buggy, "gradients_not_cleared")
    assert finding.step == 20 and finding.severity == "critical" and "zero_grad" in finding.advice
    assert finding.evidence["held_norm"] > 0
    # healthy twins: zero_grad every step; 4 micro-batches accumulated a step, zeroed after each step
    assert not alarms(plain_loop(digits_loader(), 2), "gradients_not_cleared")
    accumulating = plain_loop(digits_loader(16), 2, accumulate=4)
    assert accumulating.global_step > 40 and not alarms(accumulating, "gradients_not_cleared")
    assert alarms(plain_loop(digits_loader(16), 2, accumulate=4, zero_grad=False), "gradients_not_cleared")
    # gradients assigned, not added in (p.grad = g from torch.autograd.grad): nothing to clear
    assert not alarms(plain_loop(digits_loader(), 2, zero_grad=False, assign=True), "gradients_not_cleared")


def test_no_remedy_answers_the_symptoms_of_gradients_never_cleared(tmp_path):
    """Before this rule the run was found at step 28-69 as exploding_gradients, and reduce_lr, rollback and
    reinitialize answered its symptoms, each in vain (the sum of all gradients kept growing)."""
    watch = plain_loop(digits_loader(), 3, zero_grad=False, remedies="auto")
    assert "gradients_not_cleared" in rules_of(watch) and "exploding_gradients" in rules_of(watch)
    acted = {a.remedy for a in watch.actions if a.rule != "gradient_spike"}  # (per-step clipping may run)
    assert not acted & {"reduce_lr", "rollback", "reinitialize"}, [str(a) for a in watch.actions]


def test_lightning_manual_optimization_without_zero_grad_is_named_and_accumulation_is_not(tmp_path):
    buggy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "buggy.jsonl"))
    trainer(tmp_path, [buggy], logger=False, max_epochs=1).fit(ManualStep(zero_grad=False), digits_loader())
    assert alarms(buggy, "gradients_not_cleared")[0].step == 20
    for module, kw in ((ManualStep(), {}), (DigitsMLP(), {"accumulate_grad_batches": 4})):
        healthy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "healthy.jsonl"))
        loader = digits_loader(16)  # 90 batches: 22 optimizer steps with accumulate_grad_batches=4
        trainer(tmp_path, [healthy], logger=False, max_epochs=2, **kw).fit(module, loader)
        assert "gradients_not_cleared" not in rules_of(healthy)


# ------------------------------------------------------------------ eval_mode_training, unoptimized_parameters


def bn_mlp(momentum: float | None = 0.1, track: bool = True) -> nn.Sequential:
    """Linear, BatchNorm1d, ReLU, Dropout, Linear: both kinds of module whose mode matters."""
    bn = nn.BatchNorm1d(64, momentum=momentum, track_running_stats=track)
    return nn.Sequential(nn.Linear(64, 64), bn, nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


class Classifier(pl.LightningModule):
    """``bn_mlp`` under AdamW with a weight-decay split: weights decayed, biases and BatchNorm parameters in
    a no-decay group. ``groups="decay"`` loses the no-decay group (they end up in no optimizer)."""

    def __init__(self, net: nn.Module, groups: str = "both") -> None:
        super().__init__()
        self.net, self.groups = net, groups

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim >= 2]
        groups = [{"params": decay, "weight_decay": 0.01}]
        if self.groups == "both":
            groups.append({"params": [p for p in self.parameters() if p.ndim < 2], "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=3e-3)


def setup_fit(tmp_path, module, name, callbacks=(), **kw):
    pl.seed_everything(0)
    train, _ = digits_loaders()
    mon = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / f"{name}.jsonl"))
    trainer(tmp_path, [mon, *callbacks], logger=False, **{"max_steps": 60, **kw}).fit(module, train)
    return mon


def watched_loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 60) -> gradwatch.Watch:
    torch.manual_seed(0)
    train, _ = digits_loaders()
    with gradwatch.Watch(model, opt, remedies="off", print_summary=False) as watch:
        for _, (x, y) in zip(range(steps), train, strict=False):  # the first `steps` batches
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            watch.step(loss)
    return watch


def the_finding(monitor, rule: str):
    (finding,) = [f for f in monitor.findings if f.rule == rule and f.severity != "info"]
    return finding


def test_a_model_left_in_eval_mode_is_named_at_the_first_read(tmp_path):
    buggy = Classifier(bn_mlp())
    buggy.eval()  # left on from an evaluation before fit: Lightning keeps the mode
    finding = the_finding(setup_fit(tmp_path, buggy, "buggy"), "eval_mode_training")
    assert finding.step == 0 and finding.layer is None  # the whole model
    assert "net.1 (BatchNorm1d)" in finding.message and "net.3 (Dropout)" in finding.message
    assert "model.train()" in finding.advice
    assert rules_of(setup_fit(tmp_path, Classifier(bn_mlp()), "healthy")) == set()
    # a plain loop: a submodule put in eval and never back
    torch.manual_seed(0)
    model = nn.Sequential(bn_mlp()[:4], nn.Linear(64, 10))
    model[0].eval()
    finding = the_finding(
        watched_loop(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)), "eval_mode_training"
    )
    assert finding.step == 0 and finding.layer == "0" and "0.1 (BatchNorm1d)" in finding.message
    model = nn.Sequential(bn_mlp()[:4], nn.Linear(64, 10))
    assert rules_of(watched_loop(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))) == set()


def test_batchnorm_running_statistics_that_never_move_are_named_within_two_reads(tmp_path):
    finding = the_finding(
        setup_fit(tmp_path, Classifier(bn_mlp(momentum=0.0)), "frozen_stats"), "eval_mode_training"
    )
    assert finding.step <= 2 * 20 and finding.layer == "net.1" and "momentum" in finding.message
    for name, net in [
        ("ema", bn_mlp()),
        ("cumulative", bn_mlp(momentum=None)),
        ("batch", bn_mlp(track=False)),
    ]:
        assert rules_of(setup_fit(tmp_path, Classifier(net), name)) == set(), name


class LateHead(Classifier):
    """An auxiliary head added in ``on_train_start``, after ``configure_optimizers`` built the optimizer."""

    def on_train_start(self):
        self.aux = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net[:4](x)
        return F.cross_entropy(self.net[4](h), y) + F.cross_entropy(self.aux(h), y)


def test_parameters_no_optimizer_holds_are_named_at_the_first_read(tmp_path):
    mon = setup_fit(tmp_path, Classifier(bn_mlp(), groups="decay"), "lost_group")
    finding = the_finding(mon, "unoptimized_parameters")
    assert finding.step == 0 and "net.1.weight" in finding.message and finding.evidence["tensors"] == 4
    # the BatchNorm layer gets gradients: frozen_weights said "it gets no gradient" for it
    assert not any("no gradient" in f.message for f in mon.findings), [str(f) for f in mon.findings]
    assert "frozen_weights" not in rules_of(mon)
    finding = the_finding(setup_fit(tmp_path, LateHead(bn_mlp()), "late_head"), "unoptimized_parameters")
    assert finding.step == 0 and "aux.weight" in finding.message
    assert rules_of(setup_fit(tmp_path, Classifier(bn_mlp()), "healthy")) == set()


def test_an_optimizer_over_another_model_instance_is_named_at_the_first_read():
    torch.manual_seed(0)
    model, other = bn_mlp(), bn_mlp()
    watch = watched_loop(model, torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9))
    findings = [f for f in watch.findings if f.rule == "unoptimized_parameters" and f.severity == "warning"]
    assert [f.step for f in findings] == [0, 0]
    assert any("not the model's" in f.message and f.evidence["tensors"] == 6 for f in findings)
    model = bn_mlp()
    assert rules_of(watched_loop(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))) == set()


class FineTune(pl.LightningModule):
    """A pretrained-style backbone (BatchNorm, Dropout) frozen and kept in eval mode, a new head trained.

    ``freeze``: ``"init"`` (requires_grad=False in ``__init__``), ``"callback"`` (a callback freezes it in
    ``on_fit_start``, after gradwatch bound), ``"optimizer"`` (left out of the optimizer, trainable); any
    other: the optimizer takes what requires a gradient when it is built."""

    def __init__(self, freeze: str, eval_backbone: bool = True) -> None:
        super().__init__()
        self.freeze, self.eval_backbone = freeze, eval_backbone
        self.backbone = nn.Sequential(*bn_mlp()[:4], nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        if freeze == "init":
            self.backbone.requires_grad_(False)

    def on_train_epoch_start(self):
        if self.eval_backbone:  # the classic recipe: frozen BatchNorm statistics, no dropout
            self.backbone.eval()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        params = self.head.parameters() if self.freeze == "optimizer" else self.parameters()
        return torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-3)


class FreezeBackbone(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        pl_module.backbone.requires_grad_(False)


def test_a_fine_tune_with_a_frozen_backbone_in_eval_mode_is_silent(tmp_path):
    for freeze in ("init", "callback", "optimizer"):
        callbacks = [FreezeBackbone()] if freeze == "callback" else []
        mon = setup_fit(tmp_path, FineTune(freeze), freeze, callbacks, max_epochs=2, max_steps=-1)
        assert rules_of(mon) == set(), (
            freeze,
            [str(f) for f in mon.findings],
        )  # frozen_weights fired (callback)
    # left out of the optimizer while trainable: gradients computed for nothing, said at info
    (note,) = [f for f in mon.findings if f.rule == "unoptimized_parameters"]
    assert note.severity == "info" and "requires_grad_(False)" in note.advice
    # Lightning's own fine-tuning callback: frozen in setup, BatchNorm kept training, unfrozen at epoch 1
    finetuning = pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False)
    module = FineTune("requires_grad", eval_backbone=False)
    mon = setup_fit(tmp_path, module, "backbone_finetuning", [finetuning], max_epochs=2, max_steps=-1)
    assert rules_of(mon) == set(), [str(f) for f in mon.findings]


@pytest.mark.parametrize("program", [GaussianNLL, Reinforce, MoonsGAN, FrozenTable], ids=lambda p: p.__name__)
def test_programs_raise_no_setup_finding(tmp_path, program):
    pl.seed_everything(0)
    mon = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "events.jsonl"))
    loader = digits_loaders()[0] if program is FrozenTable else None
    trainer(tmp_path, [mon], logger=False, max_steps=100).fit(program(), loader)
    setup_rules = {"eval_mode_training", "unoptimized_parameters", "frozen_weights"}
    assert not {f.rule for f in mon.findings} & setup_rules, [str(f) for f in mon.findings]


class FullBatchGCN(pl.LightningModule):
    """A two-layer GCN on one graph, full batch (Kipf & Welling's setup): every step's batch is the same
    sparse normalized adjacency, node features and labels, one batch an epoch: legitimately repeated."""

    def __init__(self, nodes: int = 200, features: int = 16, classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, classes, (nodes,), generator=g)
        same = (labels[:, None] == labels[None, :]) & (torch.rand(nodes, nodes, generator=g) < 0.05)
        adj = (same | same.T | torch.eye(nodes, dtype=torch.bool)).float()
        d = adj.sum(1).rsqrt()
        self.graph = (
            (d[:, None] * adj * d[None, :]).to_sparse(),
            torch.randn(nodes, features, generator=g),
            labels,
        )
        self.lin1, self.lin2 = torch.nn.Linear(features, 32), torch.nn.Linear(32, classes)

    def forward(self, adj, x):
        h = torch.relu(torch.sparse.mm(adj, self.lin1(x)))
        return torch.sparse.mm(adj, self.lin2(h))

    def training_step(self, batch, batch_idx):
        adj, x, y = batch
        return torch.nn.functional.cross_entropy(self(adj, x), y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.graph], batch_size=None)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_full_batch_training_on_a_sparse_graph_trains_and_is_no_repeated_batch(tmp_path):
    """Before: the input probe raised "reshape is not implemented for sparse tensors" at step 0."""
    from gradwatch.probes import first_float_tensor

    monitor = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "gcn.jsonl"))
    model = FullBatchGCN()
    trainer(tmp_path, [monitor], logger=False, max_epochs=60).fit(model)
    assert monitor.monitor.steps_seen == 60 and "repeated_batch" not in rules_of(monitor)
    assert first_float_tensor(model.graph) is model.graph[1]  # the node features' range, not the adjacency's


# ------------------------------------------------------------------------ review: healthy programs stay silent
class BNDropoutWithVal(pl.LightningModule):
    """The most ordinary Lightning program: BatchNorm and Dropout, and a validation loop (which puts the
    model in eval mode; a read at validation end or at a checkpoint sees it so). With ``binary``, a
    one-vs-rest BCE whose float targets are mostly 0 (every sample alike in that small tensor)."""

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self.binary = binary
        out = 1 if binary else 10
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 64),
            torch.nn.BatchNorm1d(64),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(64, out),
        )

    def _loss(self, batch):
        x, y = batch
        if self.binary:
            return torch.nn.functional.binary_cross_entropy_with_logits(
                self.net(x).squeeze(-1), (y == 0).float()
            )
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_validation_in_eval_mode_is_not_training_in_eval_mode_and_float_targets_are_no_repeated_sample(
    tmp_path,
):
    """Reads at a validation's end (early stopping) or at a checkpoint came with the model in eval mode:
    eval_mode_training fired at every validation. Float 0/1 targets, the same for most samples of a batch,
    were taken for a loader repeating one sample."""
    train, val = digits_loaders()
    for binary in (False, True):
        monitor = gradwatch.HealthMonitor(events_path=str(tmp_path / f"e{binary}.jsonl"))
        trainer(tmp_path, [monitor], logger=False, max_epochs=3, val_check_interval=0.5).fit(
            BNDropoutWithVal(binary), train, val
        )
        assert not {"eval_mode_training", "repeated_batch"} & rules_of(monitor), [
            f.message for f in monitor.findings if f.severity != "info"
        ]


class Distill(pl.LightningModule):
    """Knowledge distillation: a teacher held in eval mode and run under no_grad, an EMA copy updated by
    hand; ``Adam(self.parameters())`` holds the teacher too (as in many examples), the EMA copy is held by
    no optimizer. Neither is trained, by design."""

    def __init__(self) -> None:
        super().__init__()
        self.student = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.teacher = torch.nn.Sequential(
            torch.nn.Linear(64, 64),
            torch.nn.BatchNorm1d(64),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 10),
        ).eval()
        self.ema = torch.optim.swa_utils.AveragedModel(self.student)

    def training_step(self, batch, batch_idx):
        self.teacher.eval()  # Lightning puts the whole module in train mode each epoch
        x, y = batch
        with torch.no_grad():
            soft = self.teacher(x).softmax(-1)
        logits = self.student(x)
        return F.cross_entropy(logits, y) + F.kl_div(logits.log_softmax(-1), soft, reduction="batchmean")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.student)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_a_teacher_in_eval_mode_is_not_training_in_eval_mode(tmp_path):
    """The teacher (eval, no_grad, held by Adam) was called training in eval mode. (frozen_weights still
    says its layers and the EMA copy's get no gradient: they are held by an optimizer, as a detached
    layer is; ``requires_grad_(False)`` on them says they are frozen on purpose.)"""
    monitor = gradwatch.HealthMonitor(events_path=str(tmp_path / "e.jsonl"))
    trainer(tmp_path, [monitor], logger=False, max_epochs=2).fit(Distill(), digits_loaders()[0])
    assert not {"eval_mode_training", "unoptimized_parameters"} & rules_of(monitor), [
        f.message for f in monitor.findings if f.severity != "info"
    ]
