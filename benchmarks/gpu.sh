#!/usr/bin/env bash
# gradwatch on one GPU, in one short device session (about 3.5 minutes; rerunnable).
#
#   bash benchmarks/gpu.sh                 # from the repository root, on a machine with a CUDA build of torch
#   BUDGET_S=60 bash benchmarks/gpu.sh     # a shorter overhead table (fewer interleaved rounds)
#
# What it runs, in this order, each under its own timeout so that the session always ends in time:
#   1. the host-sync tests on CUDA (tests/test_syncs.py, "cuda" cases): on a GPU ``.cpu()`` is a real
#      device-to-host copy, so the counter must see 0 syncs on non-scheduled steps and exactly 1 (the one
#      stacked transfer) on scheduled steps, for the default and the everything-on configs;     ~30 s
#   2. benchmarks/overhead.py --workload gpt: GPT-2-small-like (124M params), bf16-mixed, batch 8x1024,
#      10 warm-up + 40 timed steps per run, the configs the targets name (default: no host sync per step;
#      observe; exact_skip: the per-step skip decision, one sync per step; everything_on, norms_floor,
#      every_step) and the peers they are compared with (grad_norm, wandb_all_1 if installed),
#      rounds interleaved until
#      BUDGET_S seconds (default 100) have passed (a warm-up round and at least one timed round; if the
#      timeout's SIGTERM comes first, the current run finishes and the table of the complete rounds is
#      printed); prints the table and the default config's ratio;                                   ~150 s
#   3. benchmarks/memory.py: 1500 steps of the tests' digits MLP with the default monitor on the GPU,
#      RSS and allocated device memory every 250 steps, and their slopes;                             ~25 s
# Output goes to the terminal and to ${OUT:-/tmp}/gradwatch-gpu/{syncs,overhead,memory}.txt.
# Worst case, every stage at its timeout: 60 + (BUDGET_S + 40) + 40 s = 4 min at the default budget.
#
# Installs nothing heavy: torch with CUDA must already be there. pytorch-lightning, tensorboard,
# scikit-learn and pytest are pip-installed only if missing (with a --no-deps retry, so that pip never
# replaces the CUDA torch); gradwatch runs from this checkout through PYTHONPATH, not installed.
# wandb and transformers (peers) are used only if present; overhead.py prints a note for each one missing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline WANDB_SILENT=true
DEST="${OUT:-/tmp}/gradwatch-gpu"
mkdir -p "$DEST"
export WANDB_DIR=/tmp/gradwatch-wandb
mkdir -p "$WANDB_DIR"
BUDGET_S="${BUDGET_S:-100}"

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu.sh: torch sees no CUDA device; nothing to measure" >&2
  exit 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

for spec in pytorch_lightning:pytorch-lightning tensorboard:tensorboard sklearn:scikit-learn pytest:pytest; do
  mod="${spec%%:*}" pkg="${spec#*:}"
  python3 -c "import $mod" 2>/dev/null && continue
  pip install -q "$pkg" 2>/dev/null || pip install -q --no-deps "$pkg" || echo "gpu.sh: could not install $pkg" >&2
done

status=0
echo "== 1. host-sync counts on CUDA"
timeout -k 10 60 python3 -m pytest -q -p no:cacheprovider tests/test_syncs.py -k cuda -rA 2>&1 | tee "$DEST/syncs.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. overhead, GPT-2-small-like, bf16"
# the configs the targets name, and the peers they are compared with: more interleaved rounds fit the budget
timeout -k 20 $((BUDGET_S + 40)) python3 benchmarks/overhead.py --workload gpt --rounds 6 --budget-s "$BUDGET_S" \
  --configs default observe exact_skip everything_on norms_floor every_step grad_norm wandb_all_1 \
  2>&1 | grep -v -i warning | tee "$DEST/overhead.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. memory over 1500 steps, default monitor"
timeout -k 10 40 python3 benchmarks/memory.py --steps 1500 --every 250 --configs bare default 2>&1 \
  | grep -v -i warning | tee "$DEST/memory.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
