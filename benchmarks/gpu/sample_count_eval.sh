#!/usr/bin/env bash
# One GPU call: does P(activity) from more samples per therapy discriminate and calibrate
# better, and is the 0.5 candidate better than 0.3.0 on patients neither has seen? Simulates a
# held-out cohort (seed 2000) and evaluates the shipped 0.3.0 model and a candidate, each with
# S_LOW and S_HIGH samples per therapy, all four in parallel on the one GPU. Paired: the same
# patients, sampler (DPM-Solver++(2M), 6 steps) and seeds throughout.
#
# Needs the carried wheels and template files (benchmarks/gpu/README.md) and the candidate's
# weights at $CANDIDATE (carried). Products in $OUT: session.log and bundle.tar.gz (each
# evaluation's report.json / report.md). CPU smoke test:
#   OUT=/tmp/out N_HELD=3 LIMIT=3 S_LOW=1 S_HIGH=2 WORKERS=2 DEADLINE_S=900 \
#       CANDIDATE=var/gpu2/diffusion-v0.5-best.safetensors bash benchmarks/gpu/sample_count_eval.sh
set -u
OUT=${OUT:?set OUT}
CANDIDATE=${CANDIDATE:?set CANDIDATE}
SHIPPED=${SHIPPED:-src/ms_forecast_node/data/models/msfn-net2-diffusion-0.3.0.safetensors}
N_HELD=${N_HELD:-100}
LIMIT=${LIMIT:-100}
S_LOW=${S_LOW:-8}
S_HIGH=${S_HIGH:-32}
WORKERS=${WORKERS:-16}
DEADLINE_S=${DEADLINE_S:-370}
WORK=${WORK:-/tmp/msfn-gpu}
source "$(dirname "$0")/common.sh"

bundle() {
    local d
    for d in "$WORK"/eval/*; do
        [ -f "$d/report.json" ] || continue
        mkdir -p "$WORK/results/$(basename "$d")"
        cp "$d/report.json" "$d/report.md" "$WORK/results/$(basename "$d")/"
    done
    tar -czf "$OUT/bundle.tar.gz" -C "$WORK" logs results 2>/dev/null
    cp "$LOGS/session.log" "$OUT/session.log"
}
trap bundle EXIT

prepare_environment
TASKS="python3 benchmarks/gpu/tasks.py"
HELD=$WORK/cohorts/heldout-s2000
OMP_NUM_THREADS=1 run simulate-heldout 120 $TASKS simulate --out "$HELD" --n "$N_HELD" \
    --seed 2000 --workers "$WORKERS" || exit 1
OMP_NUM_THREADS=1 run cache-heldout 60 $TASKS cache --cohort "$HELD" \
    --config configs/cpu-2mm-centres-v0.3.yaml --workers "$WORKERS" || exit 1
EVAL_LIMIT=$(($(left) - 20))
pids=()
for model in shipped candidate; do
    weights=$SHIPPED
    [ "$model" = candidate ] && weights=$CANDIDATE
    for s in "$S_LOW" "$S_HIGH"; do
        (OMP_NUM_THREADS=4 run "eval-$model-s$s" "$EVAL_LIMIT" $TASKS evaluate --cohort "$HELD" \
            --model "$weights" --out "$WORK/eval/$model-s$s" --samples "$s" --limit "$LIMIT") &
        pids+=($!)
    done
done
wait "${pids[@]}"
say "done"
