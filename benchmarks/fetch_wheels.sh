#!/usr/bin/env bash
# Downloads, HERE (where PyPI is reachable), the wheels gpu_check.sh installs on the GPU machine, which has no
# network. That machine's image already holds torch, transformers, peft, accelerate, pytest, httpx and hypothesis
# (/work/.library/device/KINDS.md); what it lacks is the HTTP stack that tests/test_serve*.py import, so without
# these wheels `pytest -m gpu tests` could not collect those modules. The benchmarks themselves need none of them.
#
#   bash benchmarks/fetch_wheels.sh        # -> benchmarks/wheels/*.whl (ignored by git; about 3 MB)
#
# Then name benchmarks/wheels in the device call's `carry`. Versions are the ones this project's venv runs.
# The machine runs CPython 3.12 on x86-64 (manylinux); only pydantic-core is compiled.
set -euo pipefail
cd "$(dirname "$0")"
dest=wheels
mkdir -p "$dest"
pip_cmd=(python3 -m pip)
[[ -x ../.venv/bin/python ]] && pip_cmd=(../.venv/bin/python -m pip)
"${pip_cmd[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2 typing-extensions==4.16.0 \
    uvicorn==0.54.0
ls -1 "$dest"
du -sh "$dest"
