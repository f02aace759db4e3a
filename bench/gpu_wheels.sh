#!/usr/bin/env bash
# Wheels for running bench/bench_index.py on a lent GPU machine, which cannot reach a package index.
#
# That machine's image has Python 3.12 with torch (2.11, CUDA 13), numpy, pandas, pyarrow, tokenizers, safetensors
# and more, but not transformer-lens, sae-lens, pydantic, datasets or wandb, and older transformers and
# huggingface_hub than transformer-lens 3.9 is tested with here. This downloads the missing ones (the modules a run
# of bench_index.py imports, read from sys.modules on 2026-12-06; the versions this repo's tests ran with) as
# manylinux x86-64 wheels for CPython 3.12 into .whl/ (kept out of git through .git/info/exclude): ~44 MB, which
# travels with the ~5 MB working tree under the 64 MiB a call may carry. Then, on the machine (carry: .whl):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && cd bench && PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
#       python3 bench_index.py --device cuda --tokens 1000000 --corpus-repeat 10 --skip-stories \
#       --variants before,+forward,after --profile 2>&1 | tee "$OUT/bench_index.log"
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PACKAGES=(
  transformer-lens==3.9.0 sae-lens==6.54.12 transformers==5.25.0 huggingface_hub==2.4.0 pydantic==2.14.4
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 datasets==5.2.0 dill==0.4.1
  multiprocess==0.70.19 better-abc==0.0.3 docstring_parser==0.18.0 simple-parsing==0.1.9 google-re2==1.1.20251105
  wandb==0.31.0 protobuf==7.36.2 googleapis-common-protos==1.76.0 platformdirs==4.14.9 sniffio==1.3.1
  truststore==0.10.5 httpcore2==2.17.0 httpx2==2.17.0 kernels==0.19.1
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
du -sh .whl
