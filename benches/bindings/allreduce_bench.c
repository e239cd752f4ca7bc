/* Allreduce latency through the C binding; see run.sh and examples/allreduce_bench.rs (the same
 * measurement in Rust). For 8 B (1 double) and 4 MiB (524288 doubles): warm-up calls, a barrier,
 * then ITERS timed fmi_allreduce(sum) calls into a preallocated buffer; rank 0 prints
 * `size_bytes mean_us`.
 *
 *   target/release/fmi run -n 4 -- benches/bindings/allreduce_bench_c 50
 */
#define _POSIX_C_SOURCE 199309L
#include <fmi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define WARMUP 5

#define CHECK(call)                                                                            \
    do {                                                                                       \
        fmi_status s_ = (call);                                                                \
        if (s_ != FMI_OK) {                                                                    \
            fprintf(stderr, "allreduce_bench_c: %s: %s\n", fmi_status_name(s_), fmi_last_error()); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    long iters = argc > 1 ? strtol(argv[1], NULL, 10) : 50;
    if (iters <= 0) {
        fprintf(stderr, "usage: allreduce_bench_c [ITERS > 0]\n");
        return 2;
    }
    fmi_comm *comm;
    CHECK(fmi_init_from_env(&comm));
    int rank, size;
    CHECK(fmi_comm_rank(comm, &rank));
    CHECK(fmi_comm_size(comm, &size));
    const size_t counts[2] = {1, (size_t)1 << 19};
    for (int k = 0; k < 2; k++) {
        size_t count = counts[k];
        double *send = malloc(count * sizeof(double));
        double *recv = malloc(count * sizeof(double));
        if (!send || !recv) return 1;
        for (size_t i = 0; i < count; i++) {
            send[i] = rank + (double)i;
            recv[i] = 0.0;
        }
        for (int w = 0; w < WARMUP; w++)
            CHECK(fmi_allreduce(comm, send, recv, count, FMI_FLOAT64, FMI_SUM));
        CHECK(fmi_barrier(comm));
        double start = now_us();
        for (long i = 0; i < iters; i++)
            CHECK(fmi_allreduce(comm, send, recv, count, FMI_FLOAT64, FMI_SUM));
        double mean_us = (now_us() - start) / (double)iters;
        double n = size, last = (double)(count - 1);
        if (recv[count - 1] != n * last + n * (n - 1) / 2) {
            fprintf(stderr, "rank %d: wrong result %g\n", rank, recv[count - 1]);
            return 3;
        }
        if (rank == 0) printf("%zu %.1f\n", count * sizeof(double), mean_us);
        fflush(stdout);
        free(send);
        free(recv);
    }
    CHECK(fmi_barrier(comm));
    CHECK(fmi_finalize(comm));
    return 0;
}
