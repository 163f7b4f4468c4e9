"""GPU check, prepared but not yet run: gradwatch's gradient norms under Lightning's FSDP strategies and fp16.

Lightning refuses ``strategy="fsdp"`` with ``accelerator="cpu"``, so this runs on a CUDA machine::

    PYTHONPATH=. python3 benchmarks/fsdp_gpu.py            # every case, on all visible GPUs

Cases (each a short fit on random data, every_n_steps=1):

- ``fsdp1``: ``FSDPStrategy`` (FSDP1, flat parameters). Reference: the root module's ``clip_grad_norm_(inf)``,
  which reduces across shards. gradwatch does not detect FSDP1's flat parameters as sharded (docs/setups.md):
  with more than one GPU expect a mismatch of about ``sqrt(world_size)``; with one GPU they must agree.
- ``fsdp2``: ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model`` (DTensor parameters).
  Reference: ``clip_grad_norm_(inf)`` over the DTensor gradients (``full_tensor()``). Must agree.
- ``fp16-fused``: ``precision="16-mixed"`` with ``Adam(fused=True)`` on CUDA (Lightning leaves the gradients
  scaled). Reference: per-parameter norms divided by ``scaler.get_scale()``. Must agree.

Prints one JSON line per case with the largest relative difference, exits 1 if a case that must agree does not.
"""

from __future__ import annotations

import json
import math
import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch


class Net(pl.LightningModule):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.net = nn.Sequential(
            nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def configure_model(self):
        if self.case == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.case == "fp16-fused")


class Reference(pl.Callback):
    """After gradwatch: the true total gradient norm of this step, computed by the framework itself."""

    def __init__(self):
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if pl_module.case == "fsdp1":
            norm = trainer.strategy.model.clip_grad_norm_(math.inf)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
        norm = float(norm)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if pl_module.case == "fp16-fused" and scaler is not None:
            norm /= scaler.get_scale()
        self.norms[trainer.global_step] = norm


def run(case: str) -> dict:
    devices = torch.cuda.device_count()
    strategy = {"fsdp1": "fsdp", "fsdp2": pl.strategies.ModelParallelStrategy(), "fp16-fused": "auto"}[case]
    x, y = torch.randn(4096, 256), torch.randint(0, 10, (4096,))
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off", print_summary=False)
    ref = Reference()
    seen: dict[int, float] = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for rec in mon.monitor.last_stats.steps:
                seen[rec.step] = rec.grad_norm

    trainer = pl.Trainer(
        accelerator="cuda",
        devices=devices if case != "fp16-fused" else 1,
        strategy=strategy,
        precision="16-mixed" if case == "fp16-fused" else "32-true",
        max_steps=10,
        callbacks=[mon, ref, Keep()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(case), DataLoader(TensorDataset(x, y), batch_size=64))
    worst = max(abs(seen[s] - ref.norms[s]) / max(ref.norms[s], 1e-12) for s in seen)
    return {
        "case": case,
        "world_size": trainer.world_size,
        "rank": trainer.global_rank,
        "max_rel_diff": worst,
    }


if __name__ == "__main__":
    cases = sys.argv[1:] or ["fp16-fused", "fsdp2", "fsdp1"]
    failed = False
    for case in cases:
        try:
            res = run(case)
        except Exception as err:  # report and go on with the next case
            res = {"case": case, "error": f"{type(err).__name__}: {err}"}
        must_agree = case != "fsdp1" or res.get("world_size", 1) == 1
        res["ok"] = "error" not in res and (res["max_rel_diff"] < 1e-3 or not must_agree)
        failed |= must_agree and not res["ok"]
        print(json.dumps(res), flush=True)
    sys.exit(1 if failed else 0)
