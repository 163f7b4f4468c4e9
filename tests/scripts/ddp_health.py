"""Two DDP scenarios on CPU (gloo), run by ``tests/test_distributed.py`` through Lightning's script launcher.

Usage: ``python ddp_health.py OUT_DIR SCENARIO``:

- ``branch``: a module (``extra``: Linear + Tanh) runs on rank 0 only; every step is read and probed. Each
  rank writes the activation statistics gradwatch read, and its own summaries of every watched module's
  output (the reference), to ``OUT_DIR/rank<r>.json``.
- ``deadbranch``: the defaults; a branch (``extra``: Linear with its bias at -10, then ReLU: every unit
  dead) runs on rank 0 only, so reinitialize is asked about a module one rank never ran.
- ``rollback``: the defaults (``remedies="auto"``, the deferred skip decision); rank 1 alone gets a NaN
  batch at step ``NAN_STEP``. Each rank writes its snapshot ring (how many tensors each entry holds), the
  peak snapshot bytes, its actions, and bit-exact checksums of its weights right after the rollback and
  at the end; rank 0 also the checksum of the snapshot it restored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys

BATCH, STEPS, NAN_STEP = 16, 30, 25


def checksum(tensors) -> str:
    """Bit-exact: the bytes of every tensor, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str, scenario: str) -> None:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import gradwatch
    from gradwatch.probes.activations import _CONV, kind_of, summarize
    from gradwatch.sinks.summary import run_summary

    torch.set_num_threads(1)
    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.tensor(x_all, dtype=torch.float32) / 16
    y_all = torch.tensor(y_all, dtype=torch.long)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.act = nn.Linear(64, 32), nn.ReLU()
            if scenario == "branch":  # a branch taken on rank 0 only
                self.extra = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
            if scenario == "deadbranch":  # ... whose units are all dead
                self.extra = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
                nn.init.constant_(self.extra[0].bias, -10.0)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            h = self.act(self.fc1(x))
            if scenario in ("branch", "deadbranch") and self.global_rank == 0:
                h = self.extra(h)
            return self.fc2(h)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if scenario == "rollback" and self.global_step == NAN_STEP and self.global_rank == 1:
                x = torch.full_like(x, math.nan)  # only rank 1's batch is broken
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            n, r = 2 * BATCH * STEPS, self.global_rank
            data = TensorDataset(x_all[:n][r::2], y_all[:n][r::2])
            return DataLoader(data, batch_size=BATCH, shuffle=False)

    module = Module()
    own: dict[int, dict[str, list[float]]] = {}  # step -> module -> this rank's own summary
    step = [0]

    def reference(name, kind, conv):
        def hook(mod, args, output):
            if mod.training and name not in own.setdefault(step[0], {}):
                own[step[0]][name] = summarize(output, kind, conv)[0].tolist()

        return hook

    for name, m in module.named_modules():
        if (kind := kind_of(m)) is not None:
            m.register_forward_hook(reference(name, kind, isinstance(m, _CONV)))

    if scenario == "branch":
        mon = gradwatch.HealthMonitor(every_n_steps=1, probe_every_n_steps=None, remedies="off")
    else:
        mon = gradwatch.HealthMonitor(every_n_steps=1)
    out: dict = {"reads": {}, "after_rollback": None}

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step[0] = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = mon.monitor.last_stats
            out["reads"][s.step] = {
                n: [a.kind, *list(vars(a).values())[1:]] for n, a in s.activations.items()
            }
            rollbacks = [a for a in mon.actions if a.remedy == "rollback"]
            if rollbacks and out["after_rollback"] is None:  # right after the restore, before training on
                restored = rollbacks[0].detail["restored_step"]
                names = [n for n, _ in pl_module.named_parameters()]
                snap = next(s for s in mon.monitor.snapshots.ring if s.step == restored)
                out["after_rollback"] = {
                    "step": trainer.global_step,
                    "weights": checksum(p for _, p in pl_module.named_parameters()),
                    "snapshot": checksum(snap.model[n] for n in names) if snap.model else None,
                }

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true" if scenario.endswith("branch") else "ddp",
        max_steps=STEPS,
        callbacks=[mon, Keep()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    snaps = mon.monitor.snapshots
    params = list(trainer.lightning_module.parameters())
    out.update(
        rank=trainer.global_rank,
        findings=[(f.rule, f.severity, f.step, f.layer, f.message) for f in mon.findings],
        actions=[a.to_dict() for a in mon.actions],
        own=own,
        ring=[
            {"step": s.step, "tensors": sum(isinstance(v, torch.Tensor) for v in s.model.values())}
            for s in snaps.ring
        ],
        peak_bytes=snaps.peak_bytes,
        state_bytes=sum(p.numel() * p.element_size() for p in params) * 3,  # weights, Adam's two moments
        weights=checksum(params),
        finite=all(bool(torch.isfinite(p).all()) for p in params),
        memory=run_summary(mon.monitor, "finished")["memory"],  # what the summary says of this rank
    )
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
