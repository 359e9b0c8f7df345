#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with CUDA and torch but without the
# rest: wheels for diffusers, transformers, DeepCache and their needs go in .whl/ first.
#
#   scripts/gpu_check.sh fetch          # here: download the wheels into .whl/ (git-ignored)
#   scripts/gpu_check.sh run OUT_DIR    # there: install .whl/ into /tmp/site, run the check
set -euo pipefail
cd "$(dirname "$0")/.."
# What the device lacks, at the versions installed here (run "fetch" in the project's venv).
NAMES="diffusers transformers huggingface_hub safetensors tokenizers DeepCache importlib_metadata zipp regex tqdm PyYAML
filelock fsspec packaging requests hf-xet httpx2 httpcore2 h11 anyio idna certifi charset-normalizer urllib3 typer click
rich shellingham typing_extensions typing-inspection"
case "${1:-}" in
  fetch)
    mkdir -p .whl
    for w in $(python3 -m pip freeze | grep -i -E "^($(echo $NAMES | tr ' ' '|'))=="); do
      python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
    done ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    exec python3 benchmarks/gpu_check.py --out "${2:?output folder}" ;;  # exec: a SIGTERM reaches it (it writes what it has)
  *) echo "usage: $0 fetch | run OUT_DIR" >&2; exit 2 ;;
esac
