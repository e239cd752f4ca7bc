#!/usr/bin/env bash
# The Python bindings' test suite: builds and installs the `fmi` module into a virtualenv and
# runs bindings-python/tests with pytest (multi-process jobs under `fmi run`, the Lambda
# handlers, in-process checks). Exits 0 only if every test passed.
#
#   scripts/python-tests.sh [PYTEST ARGS...]
#
# FMI_VENV      the virtualenv to create or reuse (default: $CARGO_TARGET_DIR or target, /venv)
# FMI_BIN       the fmi launcher (default: target/release/fmi, built if missing)
# PYTHON        the interpreter that creates the venv (default: python3, >= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-$PWD/target}"
venv="${FMI_VENV:-$target/venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "$python" -m venv "$venv"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"

echo "== pip install maturin numpy pytest"
python -m pip install --quiet --disable-pip-version-check maturin numpy pytest

echo "== pip install ./bindings-python"
# --no-build-isolation: use the maturin just installed instead of fetching one per build.
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./bindings-python

if [ -z "${FMI_BIN:-}" ]; then
    FMI_BIN="$target/release/fmi"
    if [ ! -x "$FMI_BIN" ]; then
        echo "== cargo build --release -p fmi-cli -p fmi-lambda-example (no $FMI_BIN yet)"
        cargo build --release -p fmi-cli -p fmi-lambda-example
    fi
fi
export FMI_BIN
# The Rust Lambda handler joins a job with the Python one when it is built next to fmi.
export FMI_LAMBDA_RUST_HANDLER="${FMI_LAMBDA_RUST_HANDLER:-$(dirname "$FMI_BIN")/fmi-lambda-handler}"

echo "== pytest (FMI_BIN=$FMI_BIN)"
cd bindings-python
exec python -m pytest -p no:cacheprovider "$@" tests
