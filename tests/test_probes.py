"""gradwatch's on-device statistics equal an obvious per-parameter reference, on real fits."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsMLP, trainer

import gradwatch
from gradwatch.probes.layout import layer_of


class Reference(pl.Callback):
    """Recomputes every statistic the slow, obvious way and compares with gradwatch's after each step.

    Listed after the HealthMonitor, so its hooks run after gradwatch's on the same step.
    """

    def __init__(self, monitor: gradwatch.HealthMonitor) -> None:
        self.monitor = monitor
        self.checked = 0
        self.outputs: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        for name, m in pl_module.named_modules():
            if isinstance(m, torch.nn.Linear | torch.nn.ReLU | torch.nn.Tanh):
                m.register_forward_hook(self._keep(name))

    def _keep(self, name):
        def hook(module, args, out):
            self.outputs.setdefault(name, out.detach())  # returns None: the output is not replaced

        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.outputs.clear()
        self.batch_x = batch[0].clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layers: dict[str, float] = {}
        for name, p in pl_module.named_parameters():
            n = torch.linalg.vector_norm(p.grad).item() if p.grad is not None else 0.0
            layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + n * n
        self.grad = {k: math.sqrt(v) for k, v in layers.items()}
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = self.monitor.monitor.last_stats
        assert stats is not None and stats.step == trainer.global_step - 1
        (rec,) = stats.steps
        # gradients: per layer and total
        for layer, ref in self.grad.items():
            assert stats.grad_norm[layer] == pytest.approx(ref, rel=1e-5, abs=1e-7)
        total = math.sqrt(sum(v * v for v in self.grad.values()))
        assert rec.grad_norm == pytest.approx(total, rel=1e-5)
        assert rec.loss == pytest.approx(outputs["loss"].item(), rel=1e-6)
        assert rec.grad_nonfinite == 0 and rec.first_nonfinite is None
        assert rec.lr == pytest.approx(0.1)
        # weights after the step and update ratios
        w_sq: dict[str, float] = {}
        d_sq: dict[str, float] = {}
        b_sq: dict[str, float] = {}
        for name, p in pl_module.named_parameters():
            layer = layer_of(name)
            w_sq[layer] = w_sq.get(layer, 0.0) + torch.linalg.vector_norm(p).item() ** 2
            d_sq[layer] = d_sq.get(layer, 0.0) + torch.linalg.vector_norm(p - self.before[name]).item() ** 2
            b_sq[layer] = b_sq.get(layer, 0.0) + torch.linalg.vector_norm(self.before[name]).item() ** 2
        for layer in w_sq:
            assert stats.weight_norm[layer] == pytest.approx(math.sqrt(w_sq[layer]), rel=1e-5)
            assert stats.update_ratio[layer] == pytest.approx(math.sqrt(d_sq[layer] / b_sq[layer]), rel=1e-4)
        # inputs
        x = self.batch_x
        assert stats.inputs.mean == pytest.approx(x.mean().item(), rel=1e-5)
        assert stats.inputs.std == pytest.approx(x.std().item(), rel=1e-5)
        assert stats.inputs.max_abs == pytest.approx(x.abs().max().item())
        # activations
        for name, y in self.outputs.items():
            a = stats.activations[name]
            assert a.mean == pytest.approx(y.mean().item(), rel=1e-4, abs=1e-6)
            assert a.std == pytest.approx(y.std().item(), rel=1e-4)
            assert a.max_abs == pytest.approx(y.abs().max().item(), rel=1e-6)
            if a.kind == "relu":
                assert a.zero_frac == pytest.approx((y == 0).float().mean().item())
                assert a.dead_unit_frac == pytest.approx(
                    ((y != 0).float().mean(0) < 0.01).float().mean().item()
                )
            if a.kind == "linear":
                assert a.zero_frac == pytest.approx((y <= 0).float().mean().item())
                assert a.dead_unit_frac == pytest.approx(
                    ((y > 0).float().mean(0) < 0.01).float().mean().item()
                )
                assert a.saturated_frac == pytest.approx((y.abs() > 2.65).float().mean().item())
            if a.kind == "tanh":
                assert a.saturated_frac == pytest.approx((y.abs() > 0.99).float().mean().item())
        self.checked += 1


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_statistics_equal_per_parameter_reference(tmp_path, loaders, act):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = Reference(mon)
    trainer(tmp_path, [mon, ref], max_steps=12, logger=False).fit(DigitsMLP(act=act), loaders[0])
    assert ref.checked == 12


def test_every_step_is_recorded_between_reads(tmp_path, loaders):
    """With every_n_steps=5 each host read carries the loss and grad norm of every step since the last."""
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off")
    reads = []

    class Reads(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = mon.monitor.last_stats
            if s is not None and (not reads or reads[-1] is not s):
                reads.append(s)

    trainer(tmp_path, [mon, Losses(), Reads()], max_steps=11, logger=False).fit(DigitsMLP(), loaders[0])
    steps = [[r.step for r in s.steps] for s in reads]
    assert steps == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    got = [r.loss for s in reads for r in s.steps]
    assert got == pytest.approx(losses, rel=1e-6)
    assert all(s.activations for s in reads) and all(s.inputs is not None for s in reads)


def test_functional_activations_are_read_from_the_linear_output(tmp_path, loaders):
    """A model calling F.relu inside forward: dead/zero fractions come from the Linear feeding it."""
    model = DigitsMLP(functional=True)
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    seen = {}

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                seen["relu_zero"] = (F.relu(pl_module.net[0](batch[0])) == 0).float().mean().item()

    trainer(tmp_path, [Check(), mon], max_steps=1, logger=False).fit(model, loaders[0])
    acts = mon.monitor.last_stats.activations
    assert set(acts) == {"net.0", "net.1", "head"}
    assert acts["net.0"].kind == "linear"
    assert acts["net.0"].zero_frac == pytest.approx(seen["relu_zero"], rel=1e-6)


def test_gradient_accumulation_reads_the_accumulated_gradient(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = {}

    class Grad(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            ref[trainer.global_step] = torch.linalg.vector_norm(
                torch.stack(
                    [torch.linalg.vector_norm(p.grad) for p in pl_module.parameters() if p.grad is not None]
                )
            ).item()

    trainer(tmp_path, [mon, Grad()], max_steps=4, accumulate_grad_batches=3, logger=False).fit(
        DigitsMLP(), loaders[0]
    )
    assert mon.monitor.steps_seen == 4
    assert mon.monitor.last_stats.steps[0].grad_norm == pytest.approx(ref[3], rel=1e-5)


class RawLosses(DigitsMLP):
    """Keeps each micro-batch's loss as training_step computed it (before Lightning divides it)."""

    def __init__(self):
        super().__init__()
        self.raw: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.raw.append((self.global_step, loss.item()))
        return loss


def test_gradient_accumulation_last_short_window(tmp_path, loaders):
    """23 batches with accumulate_grad_batches=4: windows of 4,4,4,4,4 and a last one of 3 batches.

    Each window is one optimizer step: one record, the gradient as accumulated (the optimizer's), and the
    loss as the mean of the window's micro-batch losses (Lightning hands back loss / 4; gradwatch undoes it).
    """
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    grads: dict[int, float] = {}
    records = []

    class Grad(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            sq = sum(
                torch.linalg.vector_norm(p.grad).item() ** 2
                for p in pl_module.parameters()
                if p.grad is not None
            )
            grads[trainer.global_step] = math.sqrt(sq)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = mon.monitor.last_stats
            if s is not None and (not records or records[-1].step != s.steps[-1].step):
                records.extend(s.steps)

    model = RawLosses()
    assert len(loaders[0]) == 23
    trainer(tmp_path, [mon, Grad()], max_epochs=1, accumulate_grad_batches=4, logger=False).fit(
        model, loaders[0]
    )
    assert [r.step for r in records] == [0, 1, 2, 3, 4, 5] and mon.monitor.steps_seen == 6
    assert mon.monitor.setup["accumulate_grad_batches"] == 4
    for rec in records:
        window = [loss for step, loss in model.raw if step == rec.step]
        assert len(window) == (3 if rec.step == 5 else 4)
        assert rec.loss == pytest.approx(sum(window) / len(window), rel=1e-5)
        assert rec.grad_norm == pytest.approx(grads[rec.step], rel=1e-5)


class ReadLog(pl.Callback):
    """What each read carried: (step, activations?, inputs?, update ratio?, weight norms?)."""

    def __init__(self, monitor: gradwatch.HealthMonitor) -> None:
        self.monitor = monitor
        self.reads: list[tuple[int, bool, bool, bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = self.monitor.monitor.last_stats
        if (
            s is not None
            and s.step == trainer.global_step - 1
            and (not self.reads or self.reads[-1][0] != s.step)
        ):
            self.reads.append(
                (s.step, bool(s.activations), s.inputs is not None, bool(s.update_ratio), bool(s.weight_norm))
            )


@pytest.mark.parametrize("probe_every", [100, None])
def test_heavy_probes_every_read_early_then_every_probe_every_n_steps(tmp_path, loaders, probe_every):
    """Activations, inputs and update ratios at every read of the first 200 steps, then 100 steps after the last probe;
    the reads themselves (gradient and weight norms, every step's loss) keep their cadence."""
    mon = gradwatch.HealthMonitor(every_n_steps=20, probe_every_n_steps=probe_every, remedies="off")
    log = ReadLog(mon)
    trainer(tmp_path, [mon, log], max_steps=341, max_epochs=-1, logger=False).fit(DigitsMLP(), loaders[0])
    reads = list(range(0, 341, 20))
    assert [r[0] for r in log.reads] == reads and all(r[4] for r in log.reads)
    probed = [r[0] for r in log.reads if r[1]]
    assert probed == ([*range(0, 200, 20), 280] if probe_every else reads)  # 180 + 100 -> 280
    assert probed == [r[0] for r in log.reads if r[2]] == [r[0] for r in log.reads if r[3]]
    assert mon.monitor.steps_seen == 341


@pytest.mark.parametrize("kind", ["relu", "linear"])
def test_nan_outputs_are_not_dead_units(kind):
    """A NaN activation is the nonfinite rule's business: its module reads as NaN, not as dead or zero
    (``sign(NaN)`` is 0, which would otherwise count every NaN as an inactive unit)."""
    from gradwatch.probes.activations import FIELDS, summarize

    y = torch.full((16, 8), float("nan"))
    stats, _ = summarize(y, kind)
    got = dict(zip(FIELDS, stats.tolist(), strict=True))
    assert math.isnan(got["mean"]) and got["zero_frac"] == 0.0 and got["dead_unit_frac"] == 0.0
    y = torch.relu(torch.randn(16, 8)) if kind == "relu" else torch.randn(16, 8)
    y[:, 3] = 0.0 if kind == "relu" else -1.0  # unit 3 is dead
    before = y.clone()
    stats, active = summarize(y, kind)
    got = dict(zip(FIELDS, stats.tolist(), strict=True))
    assert got["dead_unit_frac"] == pytest.approx(1 / 8) and float(active[3]) == 0.0
    assert torch.equal(y, before)  # the model's own output is never modified


def test_derived_rows_match_a_plain_reference():
    """The per-step rows derived at the read (sum of squares, non-finite count, first bad position, loss)
    equal the same numbers computed plainly per row, on healthy steps, NaN and Inf gradients and a sum of
    squares beyond float32's range (exact: the rows are float64, a finite gradient is not a non-finite one)."""
    from gradwatch.recorder import StepRow, derive
    from gradwatch.stats import ROW_FIELDS

    positions = torch.tensor([0, 1, 2, 3])
    inf, nan = math.inf, math.nan
    cases = [[1.0, 2.0, 3.0, 4.0], [1.0, nan, 3.0, inf], [inf, 1.0, 1.0, 1.0], [3e19, 3e19, 0.0, 1.0]]
    rows = [
        StepRow(s, 0, 0.1, [torch.tensor(n)], [positions], [torch.tensor(float(s) + 0.5)])
        for s, n in enumerate(cases)
    ]
    got = derive(rows, n_params=4, device=torch.device("cpu"))
    assert got.shape == (len(cases), len(ROW_FIELDS))
    for s, norms in enumerate(cases):
        row = dict(zip(ROW_FIELDS, got[s].tolist(), strict=True))
        bad = [i for i, v in enumerate(norms) if not math.isfinite(v)]
        assert row["loss"] == s + 0.5
        assert row["nonfinite"] == len(bad) and row["bad"] == float(bool(bad))
        assert row["first_x_bad"] == (bad[0] if bad else 0)
        reference = sum(v * v for v in norms)
        if math.isfinite(reference):
            assert row["grad_sq"] == pytest.approx(reference, rel=1e-6)  # 1.8e39 included
        else:
            assert not math.isfinite(row["grad_sq"])


def test_weight_norms_match_per_parameter_norms():
    """The weight probe's per-layer squared norms, non-finite weights per layer, and the update ratio's
    squared norms after a step equal per-parameter ``torch.linalg.vector_norm`` summed by layer."""
    from gradwatch.probes import ParamLayout, WeightProbe

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    probe = WeightProbe(ParamLayout(net))
    with torch.no_grad():
        net[0].bias[0] = float("nan")
    before = [p.detach().clone() for p in net[2].parameters()]
    probe.snapshot()
    with torch.no_grad():
        net[2].weight.mul_(1.5)
    sq, bad, update = probe.measure()
    norm = torch.linalg.vector_norm
    assert math.isnan(sq[0]) and bad.tolist() == [1.0, 0.0]
    assert float(sq[1]) == pytest.approx(sum(float(norm(p)) ** 2 for p in net[2].parameters()), rel=1e-5)
    delta = sum(float(norm(p - b)) ** 2 for p, b in zip(net[2].parameters(), before, strict=True))
    assert float(update[0][1]) == pytest.approx(delta, rel=1e-5)
    assert float(update[1][1]) == pytest.approx(sum(float(norm(b)) ** 2 for b in before), rel=1e-5)


def test_mixed_loss_dtypes_are_derived_each_on_its_own():
    """Rows whose losses differ in dtype (an int loss next to a bfloat16 one) are converted each on its
    own: 257 stays 257."""
    from gradwatch.recorder import StepRow, derive

    pos = torch.tensor([0, 1])
    losses = [torch.tensor(257), torch.tensor(1.5, dtype=torch.bfloat16)]
    rows = [StepRow(s, 0, None, [torch.ones(2)], [pos], [loss]) for s, loss in enumerate(losses)]
    assert derive(rows, 2, torch.device("cpu"))[:, 0].tolist() == [257.0, 1.5]


# ---------------------------------------------------------------------------- data flow
class _Shared(torch.nn.Module):
    """One ReLU after fc1, fc2 and fc3, registered after fc3 (registration order would pair it with fc3)."""

    def __init__(self, inplace=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 5)
        self.act = torch.nn.ReLU(inplace=inplace)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3):
            x = self.act(fc(x))
        return self.head(x)


class _OutOfOrder(torch.nn.Module):
    """Registered act, fc2, fc1; run fc1 -> bn -> act -> dropout -> fc2, and act(fc2 + 1) (no producer)."""

    def __init__(self):
        super().__init__()
        self.act, self.fc2, self.bn, self.drop, self.fc1 = (
            torch.nn.ReLU(),
            torch.nn.Linear(6, 6),
            torch.nn.BatchNorm1d(6),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(8, 6),
        )

    def forward(self, x):
        return self.act(self.fc2(self.drop(self.act(self.bn(self.fc1(x))))) + 1)


class _Functional(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 6), torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.b(F.dropout(F.relu(self.a(x)), 0.1, self.training))


FLOWS = {
    "shared": (
        _Shared,
        {"fc1": ("fc1", (), None), "act@fc1": ("fc1", (), "fc2"), "act@fc2": ("fc2", (), "fc3")}
        | {"act@fc3": ("fc3", (), "head")},
    ),
    "shared_inplace": (
        lambda: _Shared(inplace=True),
        {"act@fc1": ("fc1", (), "fc2"), "act@fc3": ("fc3", (), "head")},
    ),
    "out_of_order": (_OutOfOrder, {"act@fc1": ("fc1", ("bn",), "fc2"), "act#2": (None, (), None)}),
    "functional": (_Functional, {"a": ("a", (), "b"), "b": ("b", (), None)}),
}


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("case", list(FLOWS))
def test_activation_calls_are_paired_by_the_forward_pass(case, grad):
    from gradwatch.probes.activations import ActivationProbe, summarize
    from gradwatch.probes.dataflow import Pair, flow_of

    build, expected = FLOWS[case]
    model = build()
    probe = ActivationProbe(model)
    x = torch.rand(16, 8)
    probe.attach()
    with torch.set_grad_enabled(grad):
        model(x).sum().backward() if grad else model(x)
    probe.detach()
    names, kinds, stats = probe.collect()
    pairs = flow_of(model).pairs
    if not grad and case == "functional":  # no autograd graph to walk back through F.relu
        expected = {**expected, "a": ("a", (), None)}
    assert {n: pairs[n] for n in expected} == {n: Pair(*p) for n, p in expected.items()}
    if case == "shared":  # each call's statistics are its own: the obvious reference, call by call
        assert [n for n in names if n.startswith("act")] == ["act@fc1", "act@fc2", "act@fc3"]
        h = x
        for fc in ("fc1", "fc2", "fc3"):
            h = torch.relu(getattr(model, fc)(h)).detach()
            ref, active = summarize(h, "relu")
            torch.testing.assert_close(stats[names.index(f"act@{fc}")], ref)
            torch.testing.assert_close(probe.activity[f"act@{fc}"], active)
    assert len(names) == len(kinds) == len(stats)


def test_registration_order_stands_in_without_a_recorded_flow():
    """A compiled model records no flow (dynamo traces the hooks): the Sequential order is used."""
    from gradwatch.probes.dataflow import Pair, pair_of

    net = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(), torch.nn.Linear(3, 2)
    )
    assert pair_of(net, "2") == Pair("0", ("1",), "3")
    assert pair_of(net, "3") == Pair("3", (), None)
    assert pair_of(net, "missing") is None
