#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machine lacks for the GPU benchmarks, into .whl/
# (git-ignored; carried with the device call, 64 MiB at most). That machine has Python 3.12 with
# its own torch, numpy, sentencepiece, timm, einops, pillow and regex (transformers too, but an
# older 5.x than ours: ours travels), and reaches no registry. Versions come from
# requirements.lock. Then run benchmarks/gpu_suite.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -ihE "^${1//-/[-_]}==" requirements.lock requirements-test.lock | head -1; }
names=(pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
       ftfy wcwidth faiss-cpu imagebind-unofficial transformers)
rm -rf .whl && mkdir .whl
for name in "${names[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$(pin "$name")"
done
du -sh .whl
