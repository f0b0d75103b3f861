#!/usr/bin/env bash
# One GPU call: simulate a training cohort larger than the CPU can make in a session (default
# 1 400 patients, seed 3000), then fine-tune the diffusion model (configs/gpu-2mm-centres-v0.5.yaml)
# and train the U-Net baseline (configs/gpu-2mm-unet-baseline.yaml) on it side by side, for
# the same wall-clock budget, keeping each run's best-validation weights (early stopping).
# The 0.4 candidate showed that 500 patients overfit long before the GPU's budget runs out.
#
# Runs from the repository root with the same carried wheels and template files as
# device_session.sh (benchmarks/gpu/README.md). Products go to $OUT: diffusion-v0.5-best,
# diffusion-v0.5-final and unet-baseline-large-best (.safetensors), session.log, bundle.tar.gz.
# The training budget shrinks to what the deadline leaves after the simulation. CPU smoke test:
#   OUT=/tmp/out N_TRAIN=12 BUDGET_S=30 WORKERS=2 DEADLINE_S=900 bash benchmarks/gpu/large_cohort.sh
set -u
OUT=${OUT:?set OUT}
N_TRAIN=${N_TRAIN:-1400}
SEED=${SEED:-3000}
BUDGET_S=${BUDGET_S:-190}
WORKERS=${WORKERS:-16}
DEADLINE_S=${DEADLINE_S:-570}
WORK=${WORK:-/tmp/msfn-gpu}
source "$(dirname "$0")/common.sh"

CD=configs/gpu-2mm-centres-v0.5.yaml
CU=configs/gpu-2mm-unet-baseline.yaml
DIFF_RUN=$WORK/runs/diffusion-v0.5
UNET_RUN=$WORK/runs/unet-baseline-large
bundle() {
    collect_runs
    tar -czf "$OUT/bundle.tar.gz" -C "$WORK" logs results 2>/dev/null
    [ -f "$DIFF_RUN/best.safetensors" ] && cp "$DIFF_RUN/best.safetensors" "$OUT/diffusion-v0.5-best.safetensors"
    [ -f "$DIFF_RUN/model.safetensors" ] && cp "$DIFF_RUN/model.safetensors" "$OUT/diffusion-v0.5-final.safetensors"
    [ -f "$UNET_RUN/best.safetensors" ] && cp "$UNET_RUN/best.safetensors" "$OUT/unet-baseline-large-best.safetensors"
    cp "$LOGS/session.log" "$OUT/session.log"
}
trap bundle EXIT

prepare_environment
TASKS="python3 benchmarks/gpu/tasks.py"
COHORT=$WORK/cohorts/train-s$SEED

OMP_NUM_THREADS=1 run simulate-train 330 $TASKS simulate --out "$COHORT" --n "$N_TRAIN" \
    --seed "$SEED" --workers "$WORKERS" || exit 1
OMP_NUM_THREADS=1 run cache-train 90 $TASKS cache --cohort "$COHORT" --config "$CD" \
    --workers "$WORKERS" || exit 1
cp "$COHORT/cohort.json" "$WORK/results/cohort-train-s$SEED.json"
# What the deadline leaves: loading the bank, the final validation and the bundle need ~70 s.
FIT=$(($(left) - 70))
((BUDGET_S > FIT)) && BUDGET_S=$FIT
say "training budget ${BUDGET_S} s"
(OMP_NUM_THREADS=4 run train-diffusion $((BUDGET_S + 60)) $TASKS train --cohort "$COHORT" \
    --out "$DIFF_RUN" --config "$CD" --time-budget-s "$BUDGET_S") &
DIFF=$!
(OMP_NUM_THREADS=4 run train-unet $((BUDGET_S + 60)) $TASKS train --cohort "$COHORT" \
    --out "$UNET_RUN" --config "$CU" --deterministic --time-budget-s "$BUDGET_S") &
UNET=$!
wait $DIFF $UNET
say "done"
