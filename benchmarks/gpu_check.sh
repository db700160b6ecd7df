#!/usr/bin/env bash
# The one command for a lent GPU machine (see benchmarks/gpu_check.py for what runs and why it is shaped so):
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke     # here: the same steps, tiny and on CPU
#
# That machine has python3 with torch, transformers, peft and pytest but no network, and runs the project
# uninstalled (src/ on PYTHONPATH). Wheels for what it lacks (the HTTP stack tests/test_serve*.py import) are
# installed from benchmarks/wheels/ when that folder travels (benchmarks/fetch_wheels.sh fills it here; name it
# in the device call's carry); without them the run goes on and only those test modules fail to collect.
# Extra arguments go to gpu_check.py (--only, --deadline-s, --results-dir, --list).
set -uo pipefail  # no -e: a failing part must not stop the others; gpu_check.py records each one
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py=python3
[[ " $* " == *" --cpu-smoke "* && -x .venv/bin/python ]] && py=.venv/bin/python  # here: the project's venv

shopt -s nullglob
wheels=(benchmarks/wheels/*.whl)
if (( ${#wheels[@]} )) && [[ " $* " != *" --cpu-smoke "* ]]; then
    site=/tmp/gpu_check_site
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${wheels[@]}"; then
        # PYTHONPATH precedes site-packages, so these win; the image lacks all of them but typing-extensions
        # and annotated-doc, and pydantic 2.14 needs typing-extensions >= 4.16.
        export PYTHONPATH="$PYTHONPATH:$site"
        echo "[gpu_check.sh] installed ${#wheels[@]} wheels into $site"
    else
        echo "[gpu_check.sh] wheel install failed; going on without them"
    fi
fi
exec "$py" benchmarks/gpu_check.py "$@"
