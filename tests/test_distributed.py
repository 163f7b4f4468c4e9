"""Distributed training on CPU with two real processes (gloo): DDP through Lightning, and sharded (FSDP2)
parameters through the Lightning-free core. Statistics equal the single-process reference; every rank
judges the same numbers; only rank zero writes."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gradwatch.sinks.events import read_events

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAN_STEP = 3


def _script():
    spec = importlib.util.spec_from_file_location("ddp_fit", os.path.join(HERE, "scripts", "ddp_fit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ddp(out, remedies: str, measure: str = "every_step"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "scripts", "ddp_fit.py"),
            str(out),
            str(NAN_STEP),
            remedies,
            measure,
        ],
        env=env,
        cwd=str(out),
        capture_output=True,
        text=True,
        timeout=120,  # a rank waiting forever on the other would hit this
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process DDP fit (Lightning's script launcher needs a script file): 6 steps, NaN on rank 1 at step 3."""
    return _ddp(tmp_path_factory.mktemp("ddp"), "off")


def test_ddp_default_rolls_a_nan_step_back_on_every_rank_alike(tmp_path):
    """The default (no per-step decision, no per-step collective): rank 1 alone sees the NaN batch, the
    averaged gradient carries it to both ranks, and both roll back to the same snapshot at the read, with
    weights finite and identical and no skip taken."""
    _, ranks, _ = _ddp(tmp_path, "auto")
    for r in ranks:
        assert [(a["remedy"], a["step"]) for a in r["actions"] if a["remedy"] != "clip_gradients"] == [
            ("rollback", NAN_STEP)
        ]
        assert any("were applied" in f["message"] for f in r["findings"])
    assert ranks[0]["actions"] == ranks[1]["actions"]
    assert ranks[0]["weights"] == ranks[1]["weights"] and all(math.isfinite(w) for w in ranks[0]["weights"])


def test_ddp_nan_on_one_rank_makes_every_rank_skip(tmp_path):
    """SkipStep(mode="exact"): rank 1 alone sees the NaN batch; both ranks skip that step together (no
    hang: the one all-reduce per step of that mode), and their weights stay finite and identical."""
    _, ranks, _ = _ddp(tmp_path, "exact")
    skips = [
        [(a["step"], a["detail"]["optimizer_step"]) for a in r["actions"] if a["remedy"] == "skip_step"]
        for r in ranks
    ]
    assert skips[0] == skips[1] == [(NAN_STEP, "skipped")]
    assert ranks[0]["weights"] == ranks[1]["weights"] and all(math.isfinite(w) for w in ranks[0]["weights"])


def test_ddp_scheduled_measure_rolls_back_on_every_rank_alike(tmp_path):
    """measure="scheduled", every 2nd step: rank 1's NaN batch at step 3 (unmeasured) poisons both ranks'
    weights through the averaged gradient; both find it at step 4 and roll back together."""
    _, ranks, _ = _ddp(tmp_path, "auto", "scheduled")
    for r in ranks:
        measured = dict.fromkeys(s["step"] for read in r["reads"] for s in read["steps"])
        assert list(measured) == [0, 2, 4]  # each batch end keeps the last read: the same one between reads
        assert {(f["rule"], f["step"]) for f in r["findings"]} == {("nonfinite", NAN_STEP + 1)}
        assert [(a["remedy"], a["step"]) for a in r["actions"]] == [("rollback", NAN_STEP + 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and all(math.isfinite(w) for w in ranks[0]["weights"])


def _reference(steps: int):
    """One process, SGD on the union of both ranks' batches: per-step loss, total and per-layer grad norms."""
    script = _script()
    model = script.build_model()
    x, y = script.digits()
    n = 2 * script.BATCH * script.STEPS
    x0, y0, x1, y1 = x[:n][0::2], y[:n][0::2], x[:n][1::2], y[:n][1::2]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    b = script.BATCH
    for k in range(steps):
        xb = torch.cat([x0[k * b : (k + 1) * b], x1[k * b : (k + 1) * b]])
        yb = torch.cat([y0[k * b : (k + 1) * b], y1[k * b : (k + 1) * b]])
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        layers = {
            f"net.{i}": math.sqrt(
                sum(torch.linalg.vector_norm(p.grad.double()).item() ** 2 for p in m.parameters())
            )
            for i, m in enumerate(model)
            if list(m.parameters())
        }
        total = math.sqrt(sum(v * v for v in layers.values()))
        out.append({"loss": loss.item(), "grad_norm": total, "layers": layers})
        opt.step()
    return out


def test_ddp_statistics_equal_the_single_process_reference(ddp_run):
    _, ranks, _ = ddp_run
    ref = _reference(NAN_STEP)
    for data in ranks:
        assert data["world_size"] == 2
        for k in range(NAN_STEP):
            read = data["reads"][k]
            (rec,) = read["steps"]
            assert rec["step"] == k
            # the loss is the mean over ranks (one all-reduce at the read): the full batch's loss
            assert rec["loss"] == pytest.approx(ref[k]["loss"], rel=1e-5)
            assert rec["grad_norm"] == pytest.approx(ref[k]["grad_norm"], rel=1e-4)
            for layer, norm in ref[k]["layers"].items():
                assert read["layers"][layer] == pytest.approx(norm, rel=1e-4)


def test_ddp_nan_on_one_rank_gives_the_same_finding_on_every_rank(ddp_run):
    _, (r0, r1), _ = ddp_run
    key = [(f["rule"], f["severity"], f["step"], f["layer"]) for f in r0["findings"]]
    assert key == [(f["rule"], f["severity"], f["step"], f["layer"]) for f in r1["findings"]]
    assert key[0] == ("nonfinite", "critical", NAN_STEP, "net.0")
    assert r0["reads"][NAN_STEP]["steps"] == r1["reads"][NAN_STEP]["steps"]  # same numbers, same decision
    assert math.isnan(r0["reads"][NAN_STEP]["steps"][0]["loss"])  # rank 0's own loss was finite


def test_ddp_only_rank_zero_writes(ddp_run):
    out, (r0, _), output = ddp_run
    events = read_events(out / "events.jsonl")
    assert [e["kind"] for e in events].count("finding") == len(r0["findings"])  # not twice
    assert [e["kind"] for e in events].count("summary") == 1
    summary = events[-1]
    assert summary["setup"]["world_size"] == 2 and summary["setup"]["strategy"] == "DDPStrategy"
    assert len(glob.glob(str(out / "tb" / "*" / "events.out.tfevents.*"))) == 1
    assert output.count("gradwatch health summary") == 1
    assert output.count("gradwatch: setup") == 0  # DEBUG: the setup is in the summary's "setup"


# ---------------------------------------------------------------------------- sharded parameters (FSDP2)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch import nn
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor

        from gradwatch.distributed import local, sharded_sq_norms
        from gradwatch.monitor import Monitor
        from gradwatch.probes import ParamLayout

        mesh = init_device_mesh("cpu", (2,))
        # 1. the helper: squared norms of row shards add up to the full tensor's
        torch.manual_seed(0)
        full = torch.randn(6, 5)
        shard = local(distribute_tensor(full, mesh, [Shard(0)]))
        assert shard.shape == (3, 5)
        total = sharded_sq_norms(torch.linalg.vector_norm(shard).square().reshape(1))
        res = {"helper": total.item(), "helper_ref": torch.linalg.vector_norm(full).square().item()}

        # 2. the Monitor on an FSDP2 model: per-layer norms of sharded gradients vs the unsharded model
        def make():
            torch.manual_seed(1)
            return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))

        ref, model = make(), make()
        fully_shard(model, mesh=mesh)
        mon = Monitor(every_n_steps=1, remedies="off", activations=False, inputs=False)
        mon.bind(model, [])
        torch.manual_seed(2)
        xs = torch.randn(2, 4, 8)  # both ranks know both batches; each trains on its own
        mon.batch_start(0, xs[rank])
        loss = model(xs[rank]).square().mean()
        loss.backward()  # FSDP2 reduce-scatters: each rank holds its shard of the averaged gradient
        mon.before_optimizer_step(0, 0, list(model.parameters()), 0.1)
        mon.batch_end(loss)
        stats = mon.last_stats
        ref_loss = torch.stack([ref(x).square().mean() for x in xs]).mean()
        ref_loss.backward()
        layers = {
            n: math.sqrt(sum(torch.linalg.vector_norm(p.grad).item() ** 2 for p in m.parameters()))
            for n, m in ref.named_children()
            if list(m.parameters())
        }
        res.update(
            sharded=ParamLayout(model).sharded,
            grad_norm=stats.grad_norm,
            grad_total=stats.steps[0].grad_norm,
            loss=stats.steps[0].loss,
            weight_norm=stats.weight_norm,
            ref_layers=layers,
            ref_total=math.sqrt(sum(v * v for v in layers.values())),
            ref_loss=ref_loss.item(),
            ref_weights={
                n: math.sqrt(sum(torch.linalg.vector_norm(p).item() ** 2 for p in m.parameters()))
                for n, m in ref.named_children()
                if list(m.parameters())
            },
            local_only=math.sqrt(
                sum(torch.linalg.vector_norm(local(p.grad)).item() ** 2 for p in model.parameters())
            ),
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        # Neither rank tears gloo down while the other still has work in flight: without the
        # barrier, the faster rank's teardown aborts the slower one now and then
        # ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def test_sharded_norms_add_up_to_the_unsharded_value(tmp_path):
    """FSDP2 (DTensor) parameters on 2 gloo processes: gradwatch sums the shards' squares, once, at the read."""
    mp.spawn(_sharded_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["helper"] == pytest.approx(res["helper_ref"], rel=1e-6)
        assert res["sharded"] is True
        for layer, norm in res["ref_layers"].items():
            assert res["grad_norm"][layer] == pytest.approx(norm, rel=1e-5)
            assert res["weight_norm"][layer] == pytest.approx(res["ref_weights"][layer], rel=1e-5)
        assert res["grad_total"] == pytest.approx(res["ref_total"], rel=1e-5)
        assert res["local_only"] < res["ref_total"] * 0.99  # one shard alone would be wrong
        assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-5)


def _sharded_clip_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from torch import nn
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from gradwatch.distributed import local
        from gradwatch.monitor import Monitor
        from gradwatch.remedies import Context

        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        reduce_any = lambda d: bool(dist.all_reduce(t := torch.tensor(float(d))) or t.item() > 0)  # noqa: E731
        ctx = Context(model=model, optimizers=lambda: [opt], reduce_any=reduce_any, world_size=2)
        mon = Monitor(every_n_steps=5, activations=False, inputs=False)  # remedies="auto"
        mon.bind(model, [], context=ctx)
        gen = torch.Generator().manual_seed(2 + rank)  # each rank trains on its own batches
        norms, factors = {}, []  # the global norms, as read (summed over the shards); per-step scaling
        for step in range(40):
            x = torch.randn(16, 8, generator=gen)
            mon.batch_start(step, x)
            opt.zero_grad()
            loss = model(x).square().mean() * (40.0 if step == 30 else 1.0)  # a gradient spike at 30
            loss.backward()
            before = torch.linalg.vector_norm(torch.stack([local(p.grad).norm() for p in model.parameters()]))
            mon.before_optimizer_step(step, 0, list(model.parameters()), 0.05)  # clips in place
            after = torch.linalg.vector_norm(torch.stack([local(p.grad).norm() for p in model.parameters()]))
            factors.append((after / before).item())  # what this rank's shard was scaled by
            opt.step()
            mon.batch_end(loss)
            norms.update({r.step: r.grad_norm for r in mon.last_stats.steps} if mon.last_stats else {})
        mon.finish()
        clips = [a.detail for a in mon.actions if a.remedy == "clip_gradients"]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"clips": clips, "norms": norms, "factors": factors}, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_sharded_clipping_uses_the_global_norm_on_every_rank(tmp_path):
    """FSDP2 with remedies="auto" on 2 gloo processes: each rank clipped on its own shard's norm, so the
    ranks scaled their shards by different amounts; the global norm clips every rank alike."""
    mp.spawn(_sharded_clip_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["factors"] == pytest.approx(ranks[1]["factors"], rel=1e-6)  # every shard scaled alike
    assert ranks[0]["factors"][30] < 0.5  # the spike was clipped
    assert ranks[0]["clips"] == ranks[1]["clips"] != []
    spike = next(c for c in ranks[0]["clips"] if 30 in c["steps"])
    assert spike["factor"] == pytest.approx(ranks[0]["factors"][30], rel=1e-5)
    assert spike["pre_clip_norm"] == pytest.approx(ranks[0]["norms"]["30"], rel=1e-5)  # the global norm


# ---------------------------------------------------------------------------- ranks that differ (DDP)
def _health(out, scenario: str) -> list[dict]:
    """``tests/scripts/ddp_health.py``: a 2-process Lightning DDP fit. A rank waiting forever on the other
    fails the test at the timeout (the whole process group is killed), instead of blocking the suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    script = os.path.join(HERE, "scripts", "ddp_health.py")
    proc = subprocess.Popen(
        [sys.executable, script, str(out), scenario],
        env=env,
        cwd=str(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 is rank 0's child: a timeout kills both
    )
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        pytest.fail(f"the DDP fit hung (a rank waited on the other):\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_activations_of_a_module_one_rank_ran_are_reduced_by_name(tmp_path):
    """A branch (``extra``: Linear + Tanh) taken on rank 0 only: the ranks' activation statistics are
    matched by module, not by position. Before, rank 0 sent 4 summaries and rank 1 two, and the stacked
    all-reduce failed. Now every rank reads the same numbers: a module that ran on both is their mean,
    the branch is rank 0's own summary (averaged over the one rank where it ran)."""
    r0, r1 = _health(tmp_path, "branch")
    assert r0["reads"] == r1["reads"] and r0["findings"] == r1["findings"]
    assert len(r0["reads"]) == 30
    for step, acts in r0["reads"].items():
        own0, own1 = r0["own"][step], r1["own"][step]
        assert set(acts) == {"fc1", "act", "extra.0", "extra.1", "fc2"} == set(own0)
        assert set(own1) == {"fc1", "act", "fc2"}
        for name in ("extra.0", "extra.1"):  # ran on rank 0 only: exactly its values
            assert acts[name][1:] == pytest.approx(own0[name], rel=1e-6, abs=1e-7)
        for name in ("fc1", "act"):  # the same module on both ranks: the mean of the two
            mean = [(a + b) / 2 for a, b in zip(own0[name], own1[name], strict=True)]
            assert acts[name][1:] == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert acts["extra.1"][0] == "tanh" and acts["act"][0] == "relu"


def test_ddp_reinitialize_on_a_module_one_rank_ran_acts_on_no_rank(tmp_path):
    """Dead units in a branch only rank 0 runs: the finding is the same on both ranks (reduced by name),
    but rank 1 holds no activity for the module. Rank 0 went into the all-reduce of the activity alone and
    waited for ever; now the ranks agree first, and act together or not at all."""
    r0, r1 = _health(tmp_path, "deadbranch")
    assert r0["findings"] == r1["findings"]
    assert any(rule == "dead_units" and layer.startswith("extra") for rule, _, _, layer, _ in r0["findings"])
    reinit = [[a for a in r["actions"] if a["remedy"] == "reinitialize"] for r in (r0, r1)]
    assert reinit[0] == reinit[1] == []


def test_ddp_only_rank_zero_keeps_snapshots_and_a_rollback_broadcasts_them(tmp_path):
    """The defaults, rank 1 alone gets a NaN batch at step 25: both ranks roll back at the same step to
    the snapshot of step 20 (taken when due on every rank: the time budget decided together). Rank 0
    holds the snapshots; rank 1 holds no copy (before: two each, 57 KiB per rank for this model) and gets
    rank 0's restored state by broadcast. After it, both ranks' weights are bit-identical to rank 0's
    snapshot, and they stay identical and finite to the end."""
    r0, r1 = _health(tmp_path, "rollback")
    rollbacks = [
        [(a["step"], a["detail"]["restored_step"]) for a in r["actions"] if a["remedy"] == "rollback"]
        for r in (r0, r1)
    ]
    assert rollbacks[0] == rollbacks[1] == [(25, 20)]
    assert r0["actions"] == r1["actions"]
    assert [s["step"] for s in r0["ring"]] == [s["step"] for s in r1["ring"]]
    assert all(s["tensors"] > 0 for s in r0["ring"]) and all(s["tensors"] == 0 for s in r1["ring"])
    assert r0["peak_bytes"] >= r0["state_bytes"] and r1["peak_bytes"] == 0
    assert r0["memory"]["snapshot_mib"] > 0 and r1["memory"]["snapshot_mib"] == 0
    a0, a1 = r0["after_rollback"], r1["after_rollback"]
    assert a0["step"] == a1["step"] == 26  # the batch end of step 25: global_step counts it already
    assert a0["weights"] == a1["weights"] == a0["snapshot"] and a1["snapshot"] is None
    assert r0["weights"] == r1["weights"] and r0["finite"] and r1["finite"]


# ---------------------------------------------------------------------------- plain loops under DDP (Watch)
def _spawn_within(worker, args: tuple, timeout: float) -> None:
    """``worker(rank, *args)`` on 2 processes; a rank waiting forever on the other fails the test at
    ``timeout`` (both processes are killed) instead of blocking the suite."""
    import time

    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the 2-process run hung past {timeout:.0f} s (a rank waited on the other)")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def _plain_fit(rank: int, ckpt: str, save: bool, resume: bool) -> dict:
    """A plain DDP loop under ``Watch`` (defaults, reads every 5 steps) for 40 steps, a loss spike at 30;
    ``save``: rank zero alone saves a checkpoint at step 27, mid-way between two reads."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = gradwatch.Watch(model, opt, every_n_steps=5, print_summary=False)
    if resume:
        saved = torch.load(ckpt, weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        watch.load_state_dict(saved["watch"])
    gen = torch.Generator().manual_seed(10 * rank)
    for step in range(40):
        x = torch.randn(16, 8, generator=gen)  # drawn for the steps a resumed run skips, too
        if step < watch.global_step:
            continue
        opt.zero_grad()
        loss = model(x).square().mean() * (40.0 if step == 30 else 1.0)
        loss.backward()
        watch.step(loss)
        if save and rank == 0 and step == 27:  # the usual plain-DDP pattern: rank zero saves alone
            state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "watch": watch.state_dict()}
            torch.save(state, ckpt)
    watch.close()
    return {
        "findings": [(f.rule, f.severity.value, f.step, f.layer) for f in watch.findings],
        "actions": [(a.remedy, a.step, a.rule) for a in watch.actions],
        "weights": [p.detach().double().sum().item() for p in net.parameters()],
        "steps_seen": watch.monitor.steps_seen,
        "last_step": watch.monitor.last_step,
    }


def _save_on_rank_zero_worker(rank: int, port: int, out_dir: str) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    try:
        ckpt = os.path.join(out_dir, "ckpt.pt")
        res = {"plain": _plain_fit(rank, ckpt, save=False, resume=False)}
        res["saved"] = _plain_fit(rank, ckpt, save=True, resume=False)
        dist.barrier()  # rank zero's checkpoint is on disk
        res["resumed"] = _plain_fit(rank, ckpt, save=False, resume=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_plain_ddp_loop_saving_on_rank_zero_alone_goes_on(tmp_path):
    """``if rank == 0: torch.save({"watch": watch.state_dict(), ...})`` in a plain DDP loop: before, the
    state_dict read the pending steps (an all-reduce) on rank 0 alone, which waited on rank 1 forever or
    paired with its next collective. Now it runs no collective and changes nothing: both ranks finish,
    alike, with the findings, actions and weights of a run that saved nothing; both resume from rank 0's
    checkpoint alike, continuing its counts."""
    _spawn_within(_save_on_rank_zero_worker, (_free_port(), str(tmp_path)), timeout=150)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for run in ("plain", "saved", "resumed"):
        assert r0[run] == r1[run], run  # the ranks judged and acted alike
    assert r0["saved"] == r0["plain"]  # saving changed nothing
    assert ["clip_gradients", 30, "gradient_spike"] in r0["plain"]["actions"]  # JSON: lists
    resumed, saved = r0["resumed"], r0["saved"]
    assert resumed["last_step"] == 39 and resumed["steps_seen"] == saved["steps_seen"] - 2  # 26, 27: unread
    assert resumed["findings"] == saved["findings"] and resumed["actions"] == saved["actions"]


# ---------------------------------------------------------------------------- a sink that fails under DDP
FULL_DISK = """
import sys
sys.path[:0] = {paths!r}
import gradwatch
import ddp_fit

_HealthMonitor = gradwatch.HealthMonitor


def _events_on_a_full_disk(**options):  # ddp_fit's monitor, its events file on /dev/full
    return _HealthMonitor(**{{**options, "events_path": "/dev/full"}})


gradwatch.HealthMonitor = _events_on_a_full_disk
ddp_fit.main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
"""


def test_ddp_events_file_that_cannot_be_written_is_logged_once_and_the_job_goes_on(tmp_path):
    """Rank zero's events file is ``/dev/full`` (every write fails with ENOSPC): the 2-process DDP fit
    finishes on both ranks, the failure is logged once (rank zero), both ranks still roll rank 1's NaN step
    back alike, and the summary says the events file is incomplete instead of pointing at it as if whole."""
    script = tmp_path / "ddp_full_disk.py"  # Lightning's launcher starts rank 1 from this file, too
    script.write_text(FULL_DISK.format(paths=[ROOT, HERE, os.path.join(HERE, "scripts")]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(NAN_STEP), "auto"],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=150,  # a rank waiting forever on the other would hit this
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    failed = [line for line in output.splitlines() if "off for the rest of the run" in line]
    assert len(failed) == 1 and "the events sink failed in finding (OSError" in failed[0], failed
    assert [(a["remedy"], a["step"]) for a in r0["actions"]] == [("rollback", NAN_STEP)]
    assert r0["actions"] == r1["actions"] and r0["findings"] == r1["findings"]
    assert r0["weights"] == r1["weights"] and all(math.isfinite(w) for w in r0["weights"])
    incomplete = "events: /dev/full (incomplete: nothing was written after the events sink failed in finding"
    assert incomplete in output
    assert output.count("gradwatch health summary") == 1
