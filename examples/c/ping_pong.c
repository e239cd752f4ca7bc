/*
 * Point-to-point latency and bandwidth between ranks 0 and 1, 8 B to 16 MiB (the C twin of
 * examples/ping_pong.rs).
 *
 *   target/release/fmi run -n 2 -- ./ping_pong [ITERS] [MAX_BYTES]
 *
 * Prints, at rank 0, one line per size: half round-trip time and bandwidth. Rank 1 checks that
 * every message arrives whole.
 */
#define _POSIX_C_SOURCE 199309L
#include <fmi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call)                                                                        \
    do {                                                                                   \
        fmi_status check_status_ = (call);                                                 \
        if (check_status_ != FMI_OK) {                                                     \
            fprintf(stderr, "ping_pong: %s: %s\n", fmi_status_name(check_status_),         \
                    fmi_last_error());                                                     \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 200;
    size_t max_bytes = argc > 2 ? (size_t)atol(argv[2]) : (size_t)16 << 20;
    if (iters < 1) iters = 1;

    fmi_comm *comm = NULL;
    int rank, size;
    CHECK(fmi_init_from_env(&comm));
    CHECK(fmi_comm_rank(comm, &rank));
    CHECK(fmi_comm_size(comm, &size));
    if (size < 2) {
        fprintf(stderr, "ping_pong needs two ranks: fmi run -n 2 -- ping_pong\n");
        return 2;
    }

    uint8_t *buf = malloc(max_bytes), *back = malloc(max_bytes);
    if (buf == NULL || back == NULL) {
        fprintf(stderr, "ping_pong: out of memory\n");
        return 1;
    }
    memset(buf, 7, max_bytes);
    if (rank == 0) printf("%10s %14s %12s\n", "bytes", "half-rtt (us)", "MB/s");

    for (size_t bytes = 8; bytes <= max_bytes; bytes *= 8) {
        long n = bytes >= (1 << 20) ? (iters < 2 ? 2 : iters > 20 ? 20 : iters) : iters;
        size_t got = 0;
        CHECK(fmi_barrier(comm));
        double start = now();
        for (long i = 0; i < n; i++) {
            if (rank == 0) {
                CHECK(fmi_send(comm, buf, bytes, FMI_BYTE, 1, 0));
                CHECK(fmi_recv(comm, back, bytes, FMI_BYTE, 1, 0, &got));
            } else if (rank == 1) {
                CHECK(fmi_recv(comm, back, bytes, FMI_BYTE, 0, 0, &got));
                if (got != bytes || back[0] != 7 || back[bytes - 1] != 7) {
                    fprintf(stderr, "ping_pong: rank 1 received %zu of %zu bytes\n", got, bytes);
                    return 3;
                }
                CHECK(fmi_send(comm, back, bytes, FMI_BYTE, 0, 0));
            }
        }
        double half = (now() - start) / (2.0 * (double)n);
        if (rank == 0) printf("%10zu %14.2f %12.1f\n", bytes, half * 1e6, (double)bytes / half / 1e6);
    }

    free(buf);
    free(back);
    CHECK(fmi_barrier(comm));
    CHECK(fmi_finalize(comm));
    return 0;
}
