#!/usr/bin/env bash
# The GPU figures of issue 13 on one GPU machine (an H200: torch with CUDA, transformers, accelerate; no network
# needed: every model is a random-weight model built from its config, benchmarks/shapes.py). About 8 minutes;
# every step has its own time limit, writes its own files under benchmarks/results/ and the script goes on if a
# step fails. Commit benchmarks/results/ afterwards (and summarize it in benchmarks/results/README.md).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --smoke    # the same steps at tiny shapes on the CPU (checks the script, ~3 min)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=benchmarks/results
if [[ "${1:-}" == "--smoke" ]]; then
    OUT=$(mktemp -d); DEVICE=cpu; DTYPE=float32; LLAVA=random:tiny; QWEN=random:tiny-qwen2.5-vl; N=4; N_MIR=4
    MIR_ARGS=(--shape tiny --gpu-device cpu
              --methods exact-cpu official-fast official-accurate exact-gpu official-fast-gpu)
    TAG=smoke
else
    DEVICE=cuda; DTYPE=bfloat16; LLAVA=random:llava-1.5-7b; QWEN=random:qwen2.5-vl-7b; N=32; N_MIR=100
    MIR_ARGS=(--n 100 --cpu-layers 2 --accurate-layers 1)
    TAG=h200
fi
mkdir -p "$OUT"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to $OUT/NAME.txt (and the terminal)
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    if ! timeout "$limit" "$@" 2>"$OUT/$name.stderr" | tee "$OUT/$name.txt"; then
        echo "!! $name failed or timed out: see $OUT/$name.stderr"; status=1
    fi
}

"$PY" - <<'PY' || exit 1
import importlib, sys
missing = [m for m in ("torch", "transformers", "numpy", "scipy", "pandas", "PIL", "tokenizers", "tqdm",
                       "threadpoolctl", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {missing}")
import torch
print("torch", torch.__version__, "CUDA", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
[[ $DEVICE == cpu ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$OUT/gpu_${TAG}_machine.txt"

# 1-2. extraction: the official loop (batch 1, generate, attention maps, all layers kept) vs mirlab vs a bare forward
step "extract_llava-1.5-7b_$TAG" 130 "$PY" benchmarks/bench_extract.py --model "$LLAVA" --device $DEVICE \
    --dtype $DTYPE --n $N --batch-size 8 --store-dtype float16 --json "$OUT/extract_llava-1.5-7b_$TAG.json"
step "extract_qwen2.5-vl-7b_$TAG" 130 "$PY" benchmarks/bench_extract.py --model "$QWEN" --device $DEVICE \
    --dtype $DTYPE --n $N --batch-size 8 --store-dtype float16 --json "$OUT/extract_qwen2.5-vl-7b_$TAG.json"
# 3. extraction + MIR of the 7B LLaVA shape at N = 100 (target: under 2 minutes), statistics on the GPU
step "extract_mir_llava-1.5-7b_n100_$TAG" 150 "$PY" benchmarks/bench_extract.py --model "$LLAVA" --device $DEVICE \
    --dtype $DTYPE --n $N_MIR --batch-size 16 --store-dtype float16 --with-mir --variants mirlab \
    --json "$OUT/extract_mir_llava-1.5-7b_n100_$TAG.json"
# 4. MIR arithmetic: 32 layers x 4096, LLaVA-1.5-shaped rows, N = 100: exact CPU / GPU vs official fast / accurate
step "mir_llava-1.5_n100_$TAG" 160 "$PY" benchmarks/bench_mir.py "${MIR_ARGS[@]}" \
    --out "$OUT/mir_llava-1.5_n100_$TAG.csv" --json "$OUT/mir_llava-1.5_n100_$TAG.json"
echo "results in $OUT"
exit $status
