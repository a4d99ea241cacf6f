#!/usr/bin/env bash
# Every GPU benchmark in one call on the lent GPU machine (its device time is short: ~15 min
# of the session's 30 are needed). On the development machine first:
#     bash scripts/device_wheels.sh            # .whl/: what the GPU machine lacks (~35 MB)
# then one device `run` with carry [".whl"] and the command `bash benchmarks/gpu_suite.sh`.
# Figures land in $OUT (*.txt, *.json); copy them into BENCHMARKS.md with the machine's name.
# The embedding job's GPU mode (bench_embed.py) needs Ray and LanceDB, whose wheels are over
# the carry limit: run it on a GPU box with the project installed (`scripts/setup.sh`). So does
# bench_tokens.py (it reads cached patch tokens through Lance): there,
#     python benchmarks/bench_tokens.py --device cuda --preset huge --llm 7b --batch-size 8
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-suite}"
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
} | tee "$out/machine.txt"

run() {  # name, seconds, script and arguments
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" python3 "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? ($name.txt)"
  tail -n 4 "$out/$name.txt"
}

# Encoder: ImageBind-huge vision encoder, bf16, beside the reference model (target >= 1,200 img/s).
run encoder_huge_bf16 240 benchmarks/bench_encoder.py --device cuda --preset huge \
  --dtype bf16 --batch-size 256 --iters 10 --warmup 3
run encoder_huge_bf16_compiled 300 benchmarks/bench_encoder.py --device cuda --preset huge \
  --dtype bf16 --batch-size 256 --iters 10 --warmup 3 --no-reference --compile
# Index: exact fp16 search over 3.3M x 1024 at batch 1024 through the serving path.
run index_exact_fp16 180 benchmarks/bench_index.py --gpu --rows 3300000 --json "$out/index.json"
# Generation: LLaMA-7B-shaped decode with the adapter (and the CPU mode's cache share).
run generate_7b 300 benchmarks/bench_generate.py --gpu yes
# Concurrent streams: in-flight batching of 1/4/16/32 streams against the serial executor, 7B-shaped fp16
# (targets: >= 10x the serial aggregate at 16 streams; batch-1 decode within 1.3x of ~4 ms/token).
run generate_serve_7b 420 benchmarks/bench_generate.py --serve --gpu yes --streams 1,4,16,32 \
  --tokens 64
# Generation against its ceiling: the hand-stepped model at batch 1 and 16 and the scheduler at
# 16 streams (the HTTP parts need the server's wheels, which do not travel here).
run generate_ceiling_7b 420 benchmarks/bench_generate_ceiling.py --device cuda --preset 7b \
  --streams 16 --tokens 64 --no-http
run generate_ceiling_profile_7b 240 benchmarks/bench_generate_ceiling.py --device cuda \
  --preset 7b --streams 16 --tokens 32 --profile
# Training: stage-1 training samples/s from the cache vs through the huge encoder (released
# way), 7B-shaped LLaMA, bf16 autocast, same step (target: >= 10x on a GPU).
run train_7b_from_cache 300 benchmarks/bench_train.py --device cuda --preset huge --llm 7b \
  --batch-size 8 --iters 5
