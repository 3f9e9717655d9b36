#!/usr/bin/env bash
# Interleaved A/B of the working tree ("cand") against another commit ("base") on a lent GPU
# machine, in one device call. Machines differ by up to a quarter and drift within a call,
# so only runs of one call, interleaved, compare (benchmarks/RESULTS.md, "Eighth GPU
# session"). Here, before the call:
#     rm -rf .gpu/base && mkdir -p .gpu/base && git archive REV agriseg | tar -x -C .gpu/base
# (.gpu/ also holds site.tar.xz, the packages the lent machine lacks: see gpu.sh), then on
# the device (carry: [".gpu"]):
#     bash benchmarks/gpu_ab.sh [OUT_DIR]
# PAIRS (default 2) cand/base pairs of `throughput.py --size $SIZE --layouts $LAYOUTS`
# (65536: the 4.3 GP mosaic; x8: one worker of 8 threads), each with --limit 450 (no
# model-only figures); NO_TESTS=1 skips the GPU tests run first. Each run's log goes to
# OUT_DIR (default $OUT, the device call's returned folder); the summary lines to stdout.
set -uo pipefail
out=${1:-${OUT:-/tmp/agriseg-gpu-ab}}
mkdir -p "$out"
t0=$(date +%s)
[ -d .gpu/base/agriseg ] || { echo "no .gpu/base/agriseg: see the comment at the top"; exit 2; }
if [ -f .gpu/site.tar.xz ] && [ ! -d /tmp/site/rasterio ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz || exit 1
fi
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export AGRISEG_BENCH_CACHE=${AGRISEG_BENCH_CACHE:-/tmp/agriseg-bench}
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}  # see gpu.sh
unset PYTHONDONTWRITEBYTECODE
root() { if [ "$1" = cand ]; then echo "$PWD"; else echo "$PWD/.gpu/base"; fi; }
for v in cand base; do
    # The package each variant imports (runs start `python -P -m agriseg`, so the working
    # tree's folder does not shadow PYTHONPATH).
    PYTHONPATH=/tmp/site:$(root $v):$PWD python3 -P -c \
        "import torch, segmentation_models_pytorch, agriseg.models.neural, agriseg.predict as p; print('$v', p.__file__)"
done
nvidia-smi -L; echo "setup $(( $(date +%s) - t0 )) s"
[ -n "${NO_TESTS:-}" ] || PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m pytest -q \
    -p no:cacheprovider tests/test_models.py -m "gpu or not slow" \
    -k "gpu or predict_classes or pickles" 2>&1 | tee "$out/pytest.log" | tail -6
n=0
run() {
    n=$((n + 1))
    echo "== $1 ($(( $(date +%s) - t0 )) s)"
    PYTHONPATH=/tmp/site:$(root "$1"):$PWD python3 benchmarks/throughput.py --limit 450 \
        --size "${SIZE:-65536}" --layouts "${LAYOUTS:-x8}" > "$out/run$n-$1.log" 2>&1
    grep -E "end to end|timings|GPU util|Error|Traceback" "$out/run$n-$1.log" \
        | sed 's/ratio=.*timings/timings/'
}
for _ in $(seq "${PAIRS:-2}"); do run cand; run base; done
echo "done in $(( $(date +%s) - t0 )) s"
