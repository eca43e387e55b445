#!/usr/bin/env bash
# The GPU half of `unlearnable bench` (docs/benchmarks.md) as one prepared run, sized for a short
# lease on a GPU machine that has PyTorch but not this project's audio stack and no network.
#
#   bash jobs/gpu_benchmark.sh --fetch-wheels   # here, with network: pinned wheels into .whl/ (~5 MB)
#   bash jobs/gpu_benchmark.sh                  # there: install .whl/ (if present), then measure
#
# On a node where `pip install -e .` already ran, skip the wheels: the second command alone works.
# Results land in $OUT (default ./bench-gpu): gpu.md/.json (HTSAT-base bf16 PGD, 50 steps: eager
# batch sweep, torch.compile and CUDA graphs at the fastest batch, TFLOP/s against the measured
# matmul ceiling), engine.md/.json (the engine and baseline tables on the GPU), and run.log.
# Each part has its own time limit, so one that overruns still leaves the others' files.
# The pipeline section is not here: Ray's wheel alone is larger than what such a lease carries.
set -uo pipefail
cd "$(dirname "$0")/.."

# laion-clap 1.1.7 and what it imports that a PyTorch GPU image (numpy 2, transformers 5) lacks.
# Checked in a Python 3.12 / numpy 2.5 / transformers 5.17 venv: engine, baseline and the GPU code
# path import and run from these alone.
WHEELS=(
    laion_clap==1.1.7 torchlibrosa==0.1.0 julius==0.2.8 librosa==0.11.0 soundfile==0.14.0 soxr==1.1.0
    cffi==2.1.1 pycparser==3.12 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7
    audioread==3.1.0 pooch==1.9.0 decorator==5.3.1 platformdirs==4.5.1
)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python_version="${PYTHON_VERSION:-3.12}"  # the GPU image's Python
    mkdir -p .whl
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" || exit
    python3 -m pip wheel -q --no-deps -w .whl wget==3.2 || exit  # sdist only on PyPI; pure Python
    du -sh .whl
    exit 0
fi

OUT="${OUT:-$PWD/bench-gpu}"
mkdir -p "$OUT"

measure() {
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    WHEEL_DIR="${BENCH_WHEELS-.whl}"  # empty: use the installed environment as it is
    if [[ -n "$WHEEL_DIR" ]] && compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl || return
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    DEVICE="${BENCH_DEVICE:-cuda}"  # cpu: a dry run of this script (with BENCH_ARGS=--quick) where no GPU is
    read -ra EXTRA <<<"${BENCH_ARGS:-}"
    gpu_args=()  # the bench's own defaults unless set here: modes eager,compiled,cudagraphs; batches 8..64
    [[ -n "${GPU_MODES:-}" ]] && gpu_args+=(--gpu-modes "$GPU_MODES")
    [[ -n "${GPU_BATCH_SIZES:-}" ]] && gpu_args+=(--gpu-batch-sizes "$GPU_BATCH_SIZES")
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)" || return

    status=0
    # 1. The GPU section: the issue's target (>= 100 ten-second windows/s, HTSAT-base, 50 steps, bf16).
    timeout "${GPU_PART_SECONDS:-420}" python3 -m pipeline.bench --device "$DEVICE" --parts gpu "${EXTRA[@]}" \
        "${gpu_args[@]}" --out "$OUT/gpu.md" --json "$OUT/gpu.json" || status=$?
    # 2. Engine (fp32 vs bf16, batch 1..4, 5 steps) and the laion-clap baseline on the same GPU.
    timeout "${ENGINE_PART_SECONDS:-150}" python3 -m pipeline.bench --device "$DEVICE" --parts engine,baseline "${EXTRA[@]}" \
        --out "$OUT/engine.md" --json "$OUT/engine.json" || status=$?
    ls -la "$OUT"
    return "$status"
}

# The log keeps each case's line ("[bench] gpu B=32 eager: ... windows/s") even where a part
# overruns its limit before writing its tables.
measure 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
