# Helpers shared by the GPU session scripts (sourced, not run). Expects OUT, WORK and
# DEADLINE_S to be set; defines T0, LOGS, say, left, run and prepare_environment.
T0=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK/logs" "$WORK/results" "$WORK/runs"
LOGS=$WORK/logs

say() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$LOGS/session.log"; }
left() { echo $((DEADLINE_S - ($(date +%s) - T0))); }
# run NAME SECONDS CMD...: a stage with its own log, stopped at min(SECONDS, time left - 15).
run() {
    local name=$1 limit=$2
    shift 2
    local cap=$(($(left) - 15))
    ((limit > cap)) && limit=$cap
    if ((limit < 5)); then
        say "skip $name: no time left"
        return 1
    fi
    say "start $name (limit ${limit} s)"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    say "end $name rc=$rc"
    tail -n 3 "$LOGS/$name.log" | sed "s/^/    $name| /" | tee -a "$LOGS/session.log"
    return $rc
}

# The GPU image has torch but not the DICOM stack: install the carried wheels (.whl/) and put
# the carried template files (.gpudata/) where the simulator looks for them.
prepare_environment() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || say "wheel install failed"
        export PYTHONPATH=/tmp/site:$PWD/src
    else
        export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -d .gpudata ]; then
        mkdir -p /tmp/site/nilearn/datasets/data /usr/share/mricron/templates
        cp .gpudata/mni_icbm152_* /tmp/site/nilearn/datasets/data/
        cp -n .gpudata/*.nii* /usr/share/mricron/templates/ 2>/dev/null
        rm -f /usr/share/mricron/templates/mni_icbm152_*
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
        python3 -c "import sys, torch, numpy, scipy; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__, 'scipy', scipy.__version__)"
        nproc
    } >"$WORK/results/machine.txt" 2>&1
    tee -a "$LOGS/session.log" <"$WORK/results/machine.txt"
}

# Each finished run's state, config and loss curve into results/, with a one-line summary.
collect_runs() {
    local r
    for r in "$WORK"/runs/*; do
        [ -f "$r/state.json" ] || continue
        python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1], 'step', s['step'], 'of', s.get('total_steps'), 'stopped_by_time', s.get('stopped_by_time_limit'), 'best', s.get('best_validation'), 'last val', s['history']['val'][-1:])" "$r/state.json" | tee -a "$LOGS/session.log"
        mkdir -p "$WORK/results/$(basename "$r")"
        cp "$r"/state.json "$r"/config.json "$r"/loss.png "$WORK/results/$(basename "$r")/" 2>/dev/null
    done
}
