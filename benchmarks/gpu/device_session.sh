#!/usr/bin/env bash
# One GPU session, end to end, in one command (a lent GPU machine keeps nothing between
# calls and is lent for minutes): simulate the training cohort, train the diffusion model and
# the U-Net baseline side by side for the same wall-clock budget, measure the few-step sampler
# against the 1000-step DDPM reference with many samples, and time forecasts at 2 mm and 1 mm.
#
# Runs from the repository root. Needs python3 with torch, numpy, scipy, pyyaml, safetensors,
# matplotlib, tqdm, rich and pillow; wheels of nibabel and pydicom in .whl/; the ICBM152 and
# mricron template files in .gpudata/ (benchmarks/gpu/README.md says how to make both).
# Everything it produces goes to $OUT (at most 8 files come back: small ones are bundled).
#
# Sizes are environment variables so that the same script runs as a CPU smoke test:
#   N_TRAIN=6 N_HELD=4 BUDGET_S=20 FID_PATIENTS=1 FID_SAMPLES=2 DEADLINE_S=900 \
#   OUT=/tmp/out bash benchmarks/gpu/device_session.sh
set -u
OUT=${OUT:?set OUT}
N_TRAIN=${N_TRAIN:-500}
N_HELD=${N_HELD:-40}
BUDGET_S=${BUDGET_S:-210}
FID_PATIENTS=${FID_PATIENTS:-16}
FID_SAMPLES=${FID_SAMPLES:-32}
WORKERS=${WORKERS:-16}
DEADLINE_S=${DEADLINE_S:-575}
WORK=${WORK:-/tmp/msfn-gpu}
source "$(dirname "$0")/common.sh"

bundle() {
    # Small products in one archive; weights as separate files (each under 16 MiB).
    tar -czf "$OUT/bundle.tar.gz" -C "$WORK" logs results 2>/dev/null
    for f in "$WORK"/runs/*/model.safetensors; do
        [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")").safetensors"
    done
    cp "$LOGS/session.log" "$OUT/session.log"
}
trap bundle EXIT

prepare_environment
TASKS="python3 benchmarks/gpu/tasks.py"
C2=configs/gpu-2mm-centres-v0.4.yaml
CU=configs/gpu-2mm-unet-baseline.yaml
C1=configs/gpu-1mm-centres.yaml
TRAIN_COHORT=$WORK/cohorts/train-s1000
HELD=$WORK/cohorts/heldout-s2000
ONE_MM=$WORK/cohorts/heldout-1mm-s2000

# --- training cohort, cache, then both trainings in the background -----------------------
OMP_NUM_THREADS=1 run simulate-train 180 $TASKS simulate --out "$TRAIN_COHORT" --n "$N_TRAIN" \
    --seed 1000 --workers "$WORKERS" || exit 1
OMP_NUM_THREADS=1 run cache-train 120 $TASKS cache --cohort "$TRAIN_COHORT" --config "$C2" \
    --workers "$WORKERS" || exit 1
TRAIN_LIMIT=$((BUDGET_S + 120))
(OMP_NUM_THREADS=4 run train-diffusion $TRAIN_LIMIT $TASKS train --cohort "$TRAIN_COHORT" \
    --out "$WORK/runs/diffusion-v0.4" --config "$C2" --time-budget-s "$BUDGET_S") &
DIFF=$!
(OMP_NUM_THREADS=4 run train-unet $TRAIN_LIMIT $TASKS train --cohort "$TRAIN_COHORT" \
    --out "$WORK/runs/unet-baseline-gpu" --config "$CU" --deterministic \
    --time-budget-s "$BUDGET_S") &
UNET=$!

# --- meanwhile: held-out cohorts, and the shipped model's sampler fidelity ----------------
OMP_NUM_THREADS=1 run simulate-heldout 90 $TASKS simulate --out "$HELD" --n "$N_HELD" \
    --seed 2000 --workers 8
[ "${SKIP_1MM:-0}" = 1 ] || OMP_NUM_THREADS=1 run simulate-1mm 90 $TASKS simulate --out "$ONE_MM" --n 1 --seed 2000 \
    --grid-mm 1 --workers 1
OMP_NUM_THREADS=4 run fidelity-shipped $((BUDGET_S + 60)) python3 benchmarks/forecast.py \
    --cohort "$HELD" --patients "$FID_PATIENTS" --samples "$FID_SAMPLES" \
    --out "$WORK/results/benchmark-shipped-during-training.json"
wait $DIFF $UNET
collect_runs

# --- the trained model alone on the GPU: 1 mm timings first, then fidelity at 2 mm -------
NEW=$WORK/runs/diffusion-v0.4/model.safetensors
if [ -f "$NEW" ]; then
    # 1 mm: the same weights on the 1 mm grid (timings only; not trained at 1 mm).
    [ "${SKIP_1MM:-0}" = 1 ] || {
        run regrid-1mm 60 $TASKS regrid --weights "$NEW" --config "$C1" \
            --out "$WORK/model-1mm-from-2mm.safetensors" &&
            run benchmark-1mm 150 python3 benchmarks/forecast.py --cohort "$ONE_MM" \
                --model "$WORK/model-1mm-from-2mm.safetensors" --method dpmpp2m --steps 6 \
                --patients 1 --samples 4 --all-patients --chunk-size 48 \
                --out "$WORK/results/benchmark-1mm.json"
    }
    run benchmark-new-2mm 200 python3 benchmarks/forecast.py --cohort "$HELD" \
        --model "$NEW" --method dpmpp2m --steps 6 --patients "$FID_PATIENTS" \
        --samples "$FID_SAMPLES" --chunk-size 48 --out "$WORK/results/benchmark-v0.4-2mm.json"
fi
say "done"
