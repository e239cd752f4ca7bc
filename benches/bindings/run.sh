#!/usr/bin/env bash
# Overhead of the C and Python bindings against the Rust API: allreduce(sum, float64) of 8 B and
# 4 MiB on 4 ranks over loopback, the three programs run alternately in one run; prints the
# median mean latency over the rounds and the ratios C/Rust and Python/Rust per size.
#
#   benches/bindings/run.sh [ROUNDS [ITERS]]      (defaults: 3 rounds, 50 timed calls per size)
#
# Builds what is missing: target/release/libfmi.so (cargo build --release -p fmi-c), the Rust
# example (cargo build --release --example allreduce_bench -p fmi-suite), the C program (cc
# against libfmi.so, with an rpath) and the Python module in the virtualenv target/venv (via
# scripts/python-tests.sh, which creates it). FMI_BIN and FMI_VENV override the launcher and
# the virtualenv; NRANKS the number of ranks (4).
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
target="${CARGO_TARGET_DIR:-$root/target}"
rounds="${1:-3}"
iters="${2:-50}"
nranks="${NRANKS:-4}"
fmi_bin="${FMI_BIN:-$target/release/fmi}"
venv="${FMI_VENV:-$target/venv}"

if [ ! -x "$fmi_bin" ]; then
    echo "== cargo build --release -p fmi-cli" >&2
    cargo build --release -p fmi-cli >&2
fi
if [ ! -f "$target/release/libfmi.so" ]; then
    echo "== cargo build --release -p fmi-c" >&2
    cargo build --release -p fmi-c >&2
fi
rust_bin="$target/release/examples/allreduce_bench"
if [ ! -x "$rust_bin" ]; then
    echo "== cargo build --release --example allreduce_bench -p fmi-suite" >&2
    cargo build --release --example allreduce_bench -p fmi-suite >&2
fi
c_bin="$target/bindings-bench/allreduce_bench_c"
c_src="$root/benches/bindings/allreduce_bench.c"
if [ ! -x "$c_bin" ] || [ "$c_src" -nt "$c_bin" ] || [ "$target/release/libfmi.so" -nt "$c_bin" ]; then
    mkdir -p "$(dirname "$c_bin")"
    echo "== cc allreduce_bench.c" >&2
    ${CC:-cc} -O2 -std=c99 -Wall -Wextra -I "$root/bindings-c/include" "$c_src" -o "$c_bin" \
        -L "$target/release" -lfmi -Wl,-rpath,"$target/release"
fi
if ! "$venv/bin/python" -c 'import fmi, numpy' 2>/dev/null; then
    echo "== building the Python module into $venv (scripts/python-tests.sh)" >&2
    FMI_VENV="$venv" bash scripts/python-tests.sh -x -q -k nothing_matches >&2 || true
    "$venv/bin/python" -c 'import fmi, numpy'
fi

# One run of one program: "size_bytes mean_us" lines from rank 0 ("[0] " prefix removed).
run_one() {
    "$fmi_bin" run -n "$nranks" --timeout 600 -- "$@" "$iters" | sed -n 's/^\[0\] //p'
}

results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for ((round = 1; round <= rounds; round++)); do
    for impl in rust c python; do
        case "$impl" in
            rust) cmd=("$rust_bin") ;;
            c) cmd=("$c_bin") ;;
            python) cmd=("$venv/bin/python" "$root/benches/bindings/allreduce_bench.py") ;;
        esac
        run_one "${cmd[@]}" | while read -r bytes us; do
            echo "$impl $bytes $us" | tee -a "$results" | sed "s/^/round $round: /" >&2
        done
    done
done

echo
echo "allreduce(sum, float64), $nranks ranks, loopback; median over $rounds rounds of the mean of $iters calls"
python3 - "$results" <<'PY'
import statistics, sys
data = {}
for line in open(sys.argv[1]):
    impl, size, us = line.split()
    data.setdefault((impl, int(size)), []).append(float(us))
def fmt(size):
    return f"{size} B" if size < 1024 else f"{size >> 20} MiB"
print("| size | Rust µs | C µs | Python µs | C/Rust | Python/Rust | rounds (Rust; C; Python) |")
print("|---|---|---|---|---|---|---|")
for size in sorted({s for _, s in data}):
    med = {i: statistics.median(data[(i, size)]) for i in ("rust", "c", "python")}
    spread = "; ".join(", ".join(f"{v:.0f}" for v in data[(i, size)]) for i in ("rust", "c", "python"))
    print(f"| {fmt(size)} | {med['rust']:.1f} | {med['c']:.1f} | {med['python']:.1f} | "
          f"{med['c'] / med['rust']:.2f}× | {med['python'] / med['rust']:.2f}× | {spread} |")
PY
