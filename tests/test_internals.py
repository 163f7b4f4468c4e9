"""Pins every private torch / Lightning access gradwatch makes (gradwatch/internals.py).

If this fails after an upgrade, the failing assertion names the access to re-check in internals.py.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
from torch import nn

from gradwatch import internals


def test_every_private_access_works_on_the_installed_versions(tmp_path):
    assert int(torch.__version__.split(".")[0]) == 2, (
        f"internals.py was checked with torch 2.x, got {torch.__version__}"
    )
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])]
    # torch._foreach_* kernels
    norms = internals.foreach_norm(tensors)
    assert [n.dtype for n in norms] == [torch.float32] * 2 and [float(n) for n in norms] == [5.0, 5.0]
    # without a dtype: float64 kept, complex norms real (float64 and complex models)
    wide = internals.foreach_norm_native([tensors[0].double(), torch.tensor([3 + 4j]), tensors[0]])
    assert [n.dtype for n in wide] == [torch.float64, torch.float32, torch.float32]
    assert [float(n) for n in wide] == [5.0, 5.0, 5.0]
    copies = internals.foreach_copy(tensors)
    assert all(c is not t and torch.equal(c, t) for c, t in zip(copies, tensors, strict=True))
    internals.foreach_mul_(copies, torch.tensor(2.0))
    assert torch.equal(copies[0], torch.tensor([6.0, 8.0]))
    assert torch.equal(internals.foreach_sub(copies, tensors)[0], tensors[0])
    internals.foreach_copy_(copies, tensors)
    assert torch.equal(copies[1], tensors[1])

    # GradScaler._scale, optimizer._step_supports_amp_scaling, the found_inf protocol of fused optimizers
    scaler = torch.amp.GradScaler("cpu")
    assert internals.scaler_scale(scaler) is None  # created lazily by the first scale()
    scaler.scale(torch.ones(()))
    assert float(internals.scaler_scale(scaler)) == scaler.get_scale() == 65536.0
    w = nn.Parameter(torch.ones(2))
    fused = torch.optim.Adam([w], lr=0.1, fused=True)
    assert internals.optimizer_handles_unscaling(fused) and not internals.optimizer_handles_unscaling(
        torch.optim.Adam([w])
    )
    from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling

    assert _optimizer_handles_unscaling(fused)  # Lightning agrees
    w.grad = torch.ones(2)
    internals.arm_found_inf(fused, torch.tensor(1.0))
    fused.step()  # the fused kernel reads found_inf: the step is skipped
    assert torch.equal(w.detach(), torch.ones(2))
    internals.clear_found_inf(fused)
    assert "found_inf" not in vars(fused) and "grad_scale" not in vars(fused)
    fused.step()
    assert not torch.equal(w.detach(), torch.ones(2))

    # class names: compiled modules, wrappers, TensorBoard loggers of either package
    net = nn.Sequential(nn.Linear(2, 2))
    assert not internals.is_compiled(net)
    assert internals.is_compiled(nn.Sequential(torch.compile(nn.Linear(2, 2))))
    assert internals.unwrap_model(torch.nn.DataParallel(net)) is net
    for logger in (
        pl.loggers.TensorBoardLogger(str(tmp_path), name="pl"),
        L.loggers.TensorBoardLogger(str(tmp_path), name="L"),
    ):
        assert internals.is_tensorboard_logger(logger)
        assert internals.event_file_writer(logger) is not None  # SummaryWriter._get_file_writer()
    prefixed = pl.loggers.TensorBoardLogger(str(tmp_path), name="p", prefix="p")
    assert internals.event_file_writer(prefixed) is None  # the logger's _prefix
    assert not internals.is_tensorboard_logger(pl.loggers.CSVLogger(str(tmp_path)))

    # Fabric: the optimizer wrapper's _strategy.precision.scaler, and the _FabricModule wrapper
    from lightning.fabric import Fabric
    from lightning.fabric.plugins import MixedPrecision

    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[fp16])
    model, opt = fabric.setup(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    assert internals.is_fabric_module(model) and isinstance(internals.unwrap_model(model), nn.Linear)
    assert isinstance(internals.fabric_scaler(opt), torch.amp.GradScaler)
    assert internals.fabric_scaler(torch.optim.SGD([w], lr=0.1)) is None


def test_the_sync_counter_base_is_torchs_dispatch_mode():
    """gradwatch.testing.SyncCounter is a TorchDispatchMode (torch.utils._python_dispatch, private)."""
    from gradwatch.testing import SyncCounter

    with SyncCounter() as counter:
        float(torch.ones(()) * 2)
    assert counter.count == 1
