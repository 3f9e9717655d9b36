#!/usr/bin/env bash
# GPU checks and the GPU throughput benchmark, as run on a lent GPU machine whose Python
# already has PyTorch (wheels for the rest in .whl/, see benchmarks/RESULTS.md):
#     bash benchmarks/gpu.sh [OUT_DIR]
# The wheels (Python 3.12 there, nothing to download from it) were fetched here with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#         rasterio==1.4.4 affine cligj click-plugins dask distributed tornado tblib zict \
#         partd locket pydantic pydantic_core annotated-types typing-inspection \
#         segmentation_models_pytorch py-spy
# and carried (`carry: [".whl"]`). Since the tree reached 28 MB, the wheels (45 MB) no longer
# fit the 64 MiB a device call takes: install them here for that Python and carry the
# installed files as an xz tarball instead (32 MB; `carry: [".gpu"]`):
#     pip install --no-deps --no-index --target /tmp/site312 --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 ... --only-binary=:all: .whl/*.whl
#     mkdir -p .gpu && tar -C /tmp/site312 -cf - . | xz -T0 -9 > .gpu/site.tar.xz
# rasterio 1.4.4, as a pip install gets it today: its
# wheels bundle GDAL 3.10 with libdeflate; 1.4.3's (GDAL 3.9, zlib: "DEFLATE_SUBCODEC_LIBDEFLATE
# unsupported in this build"), carried until 2026-11-27, read tiles 1.5x slower here.
# (the run needs no geopandas/pyogrio/shapely/pyproj: post-processing is skipped).
# 1. the `gpu`-marked tests (local GPU worker layout, CUDA against ONNX Runtime on CPU) and the
#    PyTorch reduction tests, all of them (no -x: one failure hid the others on 2026-11-28);
# 2. benchmarks/throughput.py on a 1 GP mosaic, local GPU worker layouts WORKERSxTHREADS
#    (a trailing p: worker processes). NO_TESTS=1 skips 1; LIMIT=MP/s skips the model-only
#    and read figures; RUNNER_THREADS=1,8 adds the model call from that many threads at once
#    with and without CUDA graphs (AGRISEG_CUDA_GRAPHS=0 turns them off in the runs); WRAP
#    prefixes the runs' command (a profiler: WRAP="/tmp/site/bin/py-spy record -r 40 --idle
#    -f speedscope -o $OUT/spy.json --"). The
#    host settings the tile threads share are environment variables. To A/B two commits in
#    one call, put each one's package first on PYTHONPATH (PYTHONPATH=/tmp/site:$PWD/.gpu/base
#    python3 benchmarks/throughput.py ...): the runs start `python -P -m agriseg`, so the
#    working tree's package does not shadow it (until 2026-11-27 it did: -m puts the current
#    folder first). For host settings, e.g. in one call:
#        for a in 2 16; do MALLOC_ARENA_MAX=$a NO_TESTS=1 LIMIT=481 LAYOUTS=x8 \
#            bash benchmarks/gpu.sh; done        (GDAL_CACHEMAX=512 likewise)
set -uo pipefail
out=${1:-${OUT:-/tmp/agriseg-gpu}}
mkdir -p "$out"
if [ -f .gpu/site.tar.xz ] && [ ! -d /tmp/site/rasterio ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/site.tar.xz || exit 1
elif [ -d .whl ] && [ ! -d /tmp/site/rasterio ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
# Once installed, later calls on the same machine (and copies of the tree) reuse them.
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 AGRISEG_BENCH_CACHE=${AGRISEG_BENCH_CACHE:-/tmp/agriseg-bench}
# The lent machines' Python packages carry no bytecode and none is written beside them, so
# every process compiled PyTorch's and SymPy's sources again: 7.5 s of a 41 s 1 GP run under
# py-spy (2026-11-27). An installed package has its bytecode (pip and conda compile it), so
# the runs get theirs from a cache folder, filled once here.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
python3 -c "import torch, segmentation_models_pytorch, distributed, rasterio, agriseg.cli"
nvidia-smi -L; ls /dev/nvidia* | head -3; nproc
python3 -c "import torch, rasterio, distributed; print('torch', torch.__version__, \
torch.cuda.is_available(), 'rasterio', rasterio.__version__, rasterio.__gdal_version__, \
'distributed', distributed.__version__)"
[ -n "${NO_TESTS:-}" ] || timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_models.py \
    -m "gpu or not slow" -k "gpu or predict_classes or pickles" 2>&1 \
    | tee "$out/pytest.log" | tail -15
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/throughput.py --size "${SIZE:-32768}" \
    --layouts "${LAYOUTS:-1x8,1x16}" ${LIMIT:+--limit $LIMIT} \
    ${RUNNER_THREADS:+--runner-threads $RUNNER_THREADS} ${WRAP:+--wrap "$WRAP"} 2>&1 \
    | tee "$out/throughput.log"
