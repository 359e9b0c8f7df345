#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with CUDA and torch but without the
# rest: wheels for diffusers, transformers, DeepCache and their needs go in .whl/ first.
#
#   scripts/gpu_check.sh fetch          # here: download the wheels into .whl/ (git-ignored)
#   scripts/gpu_check.sh run OUT_DIR    # there: install .whl/ into /tmp/site, run the check
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 transformers==5.24.0 huggingface-hub==1.1.4 safetensors==0.8.0 tokenizers==0.22.1
        DeepCache==0.1.1 importlib_metadata==8.7.0 zipp==3.23.0 regex==2025.11.3 tqdm==4.70.1 pyyaml==6.0.4
        filelock==3.20.0 fsspec==2025.10.0 packaging==25.0 requests==2.32.5 typer-slim==0.20.0 hf-xet==1.2.0)
case "${1:-}" in
  fetch)
    mkdir -p .whl
    for w in "${WHEELS[@]}"; do
      python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
    done ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    python3 benchmarks/gpu_check.py --out "${2:?output folder}" ;;
  *) echo "usage: $0 fetch | run OUT_DIR" >&2; exit 2 ;;
esac
