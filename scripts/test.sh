#!/usr/bin/env bash
# The whole test suite, as the README documents it and .ci/run calls it.
#
# It installs and starts every real server the tests need (through scripts/services.sh once the
# storage and NAT channels exist), then runs every test of the workspace: unit tests, the channel
# conformance suites, the collectives matrix, multi-process jobs and doc tests.
#
# CARGO_TARGET_DIR may point outside the clone to reuse builds between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

if [ -x scripts/services.sh ]; then
    # shellcheck disable=SC1091
    # Assigned first so that a failed start stops the suite here (eval of a failed command
    # substitution would not).
    services_env="$(scripts/services.sh start)"
    eval "$services_env"
    trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
fi

# Every optional channel is part of the suite; one feature selection for clippy and tests so
# nothing is built twice.
FEATURES="fmi-suite/aws,fmi-cli/aws,fmi-storage/tls"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features "$FEATURES" --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --release --features "$FEATURES" 2>&1 | tee target-test.log
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' target-test.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' target-test.log | awk '{s+=$1} END {print s+0}')
rm -f target-test.log
echo "suite: ${passed} passed, ${failed} failed"
