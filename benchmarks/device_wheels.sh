#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh needs on a GPU machine without network (Python 3.12, x86-64):
# what mitigate imports that such machines lack (pydantic) and the transformers version the project is
# tested with. Run on a machine with network, in the repository root; .whl/ is git-ignored.
set -euo pipefail
mkdir -p .whl
for spec in "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
            "transformers==5.24.0"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
