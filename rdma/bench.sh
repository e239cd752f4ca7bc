#!/usr/bin/env bash
# RDMA ping-pong: fmi's rdma channel against libfabric's own fi_pingpong, in one run, on the
# providers that work without RDMA hardware (shm, tcp;ofi_rxm). Loopback only.
#
#   cargo build --release --workspace --bins --examples --features rdma
#   bash rdma/bench.sh [ROUNDS]        # default 3 rounds, interleaved
#   PINGPONG_RECV=1 bash rdma/bench.sh # fmi receives with `recv` (a new Vec per message)
#                                      # instead of `recv_into` into a reused buffer
#   BENCH_STDERR=FILE                  # append fmi's stderr (the channel's counters) to FILE
#
# Prints, per provider and round, the half round trip at 64 B and the bandwidth at 1 MiB of both,
# and the ratios fmi / fi_pingpong. fmi's rank 1 answers from a send buffer of its own, as
# fi_pingpong's server does; the column "echo" is fmi's 1 MiB bandwidth when rank 1 sends back the
# buffer it has just received into (rdma_pingpong's `echo`, as the MPI baseline does). Needs
# fi_pingpong (apt-get install -y libfabric-bin).
# With the MPI baseline built (--features mpi-baseline) and mpiexec installed, MPICH runs the
# same sizes in each round: its shared-memory path beside shm, its network path
# (MPIR_CVAR_NOLOCAL=1 UCX_TLS=tcp,self) beside tcp;ofi_rxm (averages of its OSU-style loop).
set -euo pipefail
T=${CARGO_TARGET_DIR:-target}/release
ROUNDS=${1:-3}
command -v fi_pingpong >/dev/null || { echo "fi_pingpong missing: apt-get install -y libfabric-bin" >&2; exit 1; }
[ -x "$T/fmi" ] && [ -x "$T/examples/rdma_pingpong" ] || { echo "build first (see the header)" >&2; exit 1; }

# Each side on a core of its own, as `fmi run` binds its ranks (rank i on the i-th allowed core)
# and MPICH runs with -bind-to core: the fi_pingpong server on the first allowed core, the
# client on the second. Unbound when fewer than two cores are allowed.
mapfile -t CPUS < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)), sep="\n")' 2>/dev/null || true)
PIN0=() PIN1=()
if [ "${#CPUS[@]}" -ge 2 ] && command -v taskset >/dev/null; then
    PIN0=(taskset -c "${CPUS[0]}") PIN1=(taskset -c "${CPUS[1]}")
fi

# fi_pingpong PROVIDER SIZE ITERS -> "half-rtt-us MB/s" (client side's report)
fipp() {
    local prov=$1 size=$2 iters=$3
    local dom=()
    [ "$prov" = shm ] || dom=(-d lo)   # loopback only
    timeout 60 "${PIN0[@]}" fi_pingpong -p "$prov" "${dom[@]}" -e rdm -S "$size" -I "$iters" >/dev/null 2>&1 &
    local srv=$!
    local out=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        if out=$(timeout 60 "${PIN1[@]}" fi_pingpong -p "$prov" "${dom[@]}" -e rdm -S "$size" -I "$iters" 127.0.0.1 2>/dev/null); then
            break
        fi
        sleep 0.2   # the server's out-of-band socket is not listening yet
    done
    wait "$srv" || true
    echo "$out" | awk 'NR>1 && NF>=7 {l=$7" "$6} END {print l}'
}

# examples/rdma_pingpong under fmi run with the rdma channel -> lines "bytes half-rtt-us MB/s";
# arguments after the provider go to rdma_pingpong (default: 64:20000 1048576:400)
fmipp() {
    local prov=$1
    shift
    local dom=lo
    [ "$prov" = shm ] && dom=
    [ $# -gt 0 ] || set -- 64:20000 1048576:400
    FMI_RDMA_PROVIDER="$prov" FMI_RDMA_DOMAIN="$dom" timeout 120 "$T/fmi" run -n 2 --channel rdma -- \
        "$T/examples/rdma_pingpong" "$@" ${PINGPONG_RECV:+recv} 2>>"${BENCH_STDERR:-/dev/null}" \
        | sed 's/^\[0\] *//' | awk '$1 ~ /^[0-9]+$/ {print $1, $2, $3}'
}

# MPICH's ping-pong of SIZE bytes, ITERS times, on the path for PROVIDER -> average half round
# trip in µs and MB/s; "- -" without the baseline.
mpipp() {
    local prov=$1 size=$2 iters=$3
    local base="$T/fmi-mpi-baseline"
    if ! [ -x "$base" ] || ! command -v mpiexec >/dev/null; then echo "- -"; return; fi
    local env=()
    [ "$prov" = shm ] || env=(MPIR_CVAR_NOLOCAL=1 UCX_TLS=tcp,self)
    env "${env[@]}" timeout 120 mpiexec -n 2 -bind-to core "$base" --op pingpong --sizes "$size" --iters "$iters" 2>/dev/null \
        | awk -v n="$size" '$1=="fmi-bench-result" {printf "%.2f %.1f\n", $4*1e6, n/$4/1e6}'
}

printf '%-12s %5s %12s %12s %7s %14s %14s %7s %10s %13s %15s\n' provider round "fi 64B us" "fmi 64B us" ratio "fi 1MiB MB/s" "fmi 1MiB MB/s" ratio "echo MB/s" "mpich 64B us" "mpich 1MiB MB/s"
for r in $(seq 1 "$ROUNDS"); do
    for prov in shm "tcp;ofi_rxm"; do
        read -r fi_lat _ < <(fipp "$prov" 64 20000) || fi_lat=0
        read -r _ fi_bw < <(fipp "$prov" 1048576 400) || fi_bw=0
        fmi_out=$(fmipp "$prov")
        fmi_lat=$(echo "$fmi_out" | awk '$1==64 {print $2}')
        fmi_bw=$(echo "$fmi_out" | awk '$1==1048576 {print $3}')
        echo_bw=$(fmipp "$prov" 1048576:400 echo | awk '$1==1048576 {print $3}')
        read -r mpi_lat _ < <(mpipp "$prov" 64 20000) || mpi_lat=-
        read -r _ mpi_bw < <(mpipp "$prov" 1048576 400) || mpi_bw=-
        printf '%-12s %5s %12s %12s %7s %14s %14s %7s %10s %13s %15s\n' "$prov" "$r" "$fi_lat" "$fmi_lat" \
            "$(awk -v a="$fmi_lat" -v b="$fi_lat" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-" }')" \
            "$fi_bw" "$fmi_bw" \
            "$(awk -v a="$fmi_bw" -v b="$fi_bw" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-" }')" \
            "$echo_bw" "$mpi_lat" "$mpi_bw"
    done
done
