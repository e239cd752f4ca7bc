#!/usr/bin/env bash
# The whole test suite, as the README documents it and .ci/run calls it.
#
# 1. installs the system packages the tests need (cmake for the C example; the servers are
#    installed by scripts/services.sh) when missing,
# 2. starts every real server on loopback (Redis, s3s-fs, dynalite) through scripts/services.sh,
# 3. checks formatting and clippy, runs every Rust test of the workspace in release mode (unit
#    tests, conformance suites against the real servers, collectives matrices, multi-process jobs
#    through `fmi run`, the C bindings' C programs, doc tests),
# 4. builds the Python module into a virtualenv and runs its pytest suite under `fmi run`.
#
# CARGO_TARGET_DIR may point outside the clone to reuse builds between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

if ! command -v cmake >/dev/null 2>&1; then
    echo "== installing cmake (for the C CMake example)"
    if ! apt-get install -y -qq cmake >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && apt-get install -y -qq cmake >/dev/null
    fi
fi
# The rdma feature (libfabric channel, docs/rdma.md) needs libfabric's headers, fi_pingpong and
# libclang (bindgen) to build.
if ! pkg-config --exists libfabric 2>/dev/null || ! command -v fi_info >/dev/null 2>&1 \
    || ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
    echo "== installing libfabric-dev libfabric-bin libclang-dev pkg-config (for the rdma channel)"
    if ! apt-get install -y -qq libfabric-dev libfabric-bin libclang-dev pkg-config >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && apt-get install -y -qq libfabric-dev libfabric-bin libclang-dev pkg-config >/dev/null
    fi
fi
# The C bindings' CMake test fails rather than skips in the suite.
export FMI_REQUIRE_CMAKE=1

# MPICH and libclang for the MPI baseline of `fmi bench --vs-mpi` (bench/mpi-baseline; rsmpi
# runs bindgen against mpi.h).
if ! command -v mpirun.mpich >/dev/null 2>&1 || ! dpkg -s libmpich-dev libclang-dev >/dev/null 2>&1; then
    echo "== installing MPICH and libclang (for the MPI baseline)"
    if ! apt-get install -y -qq mpich libmpich-dev libclang-dev >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && apt-get install -y -qq mpich libmpich-dev libclang-dev >/dev/null
    fi
fi
# rsmpi finds MPI through $MPICC; pin MPICH's in case Open MPI is installed too.
export MPICC=mpicc.mpich

# Assigned first so that a failed start stops the suite here (eval of a failed command
# substitution would not).
services_env="$(scripts/services.sh start)"
eval "$services_env"
trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT

# Every optional channel is part of the suite; one feature selection for clippy and tests so
# nothing is built twice.
FEATURES="fmi-suite/aws,fmi-cli/aws,fmi-storage/tls,fmi-mpi-baseline/mpi-baseline,fmi-suite/rdma,fmi-cli/rdma"
# With the baseline built, `fmi bench --vs-mpi`'s test fails instead of skipping.
export FMI_REQUIRE_MPI=1
log="$(mktemp)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features "$FEATURES" --quiet -- -D warnings
# `cargo test` does not build a crate whose only library types are cdylib and staticlib, so the
# C library (libfmi.so, libfmi.a) the C tests link is built here, with the same selection (no
# other unit is built twice).
echo "== cargo build"
cargo build --workspace --release --features "$FEATURES"
echo "== cargo test"
cargo test --workspace --release --no-fail-fast --features "$FEATURES" 2>&1 | tee "$log"
rust_passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
echo "== python tests"
bash scripts/python-tests.sh 2>&1 | tee "$log"
py_passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -n 1 | awk '{print $1+0}')
rm -f "$log"
# Reaching this line means every step passed (set -e, pipefail).
echo "suite: $((rust_passed + ${py_passed:-0})) passed, 0 failed"
