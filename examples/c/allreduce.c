/*
 * Every rank contributes rank + 1 and a vector; prints the sum and the vector's checksum
 * (the C twin of examples/allreduce.rs).
 *
 *   cargo build --release -p fmi-c -p fmi-cli
 *   cc -I bindings-c/include examples/c/allreduce.c -L target/release -lfmi \
 *      -Wl,-rpath,$PWD/target/release -o allreduce
 *   target/release/fmi run -n 4 -- ./allreduce
 *
 * prints, once per rank, "rank R/N: allreduce sum = S" with S = N(N+1)/2, then
 * "rank R/N: vector checksum = C".
 */
#include <fmi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Stops the program with fmi's message when a call fails. */
#define CHECK(call)                                                                        \
    do {                                                                                   \
        fmi_status check_status_ = (call);                                                 \
        if (check_status_ != FMI_OK) {                                                     \
            fprintf(stderr, "allreduce: %s: %s\n", fmi_status_name(check_status_),         \
                    fmi_last_error());                                                     \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

/* Length of the vector each rank contributes. */
#define LEN (1 << 16)

int main(void) {
    fmi_comm *comm = NULL;
    int rank, size;
    CHECK(fmi_init_from_env(&comm));
    CHECK(fmi_comm_rank(comm, &rank));
    CHECK(fmi_comm_size(comm, &size));

    uint64_t mine = (uint64_t)rank + 1, sum = 0;
    CHECK(fmi_allreduce(comm, &mine, &sum, 1, FMI_UINT64, FMI_SUM));
    printf("rank %d/%d: allreduce sum = %llu\n", rank, size, (unsigned long long)sum);

    /* Element i of rank r is r + i, so the reduced element i is n*i + n(n-1)/2. */
    double *vec = malloc(LEN * sizeof *vec), *total = malloc(LEN * sizeof *total);
    if (vec == NULL || total == NULL) {
        fprintf(stderr, "allreduce: out of memory\n");
        return 1;
    }
    for (int i = 0; i < LEN; i++) vec[i] = (double)rank + (double)i;
    CHECK(fmi_allreduce(comm, vec, total, LEN, FMI_FLOAT64, FMI_SUM));
    double checksum = 0, n = (double)size;
    for (int i = 0; i < LEN; i++) checksum += total[i];
    double expected = n * ((double)LEN * ((double)LEN - 1.0) / 2.0) + (double)LEN * n * (n - 1.0) / 2.0;
    if (checksum != expected) {
        fprintf(stderr, "rank %d: checksum %.1f != expected %.1f\n", rank, checksum, expected);
        return 2;
    }
    printf("rank %d/%d: vector checksum = %.0f\n", rank, size, checksum);
    free(vec);
    free(total);

    CHECK(fmi_barrier(comm));
    CHECK(fmi_finalize(comm));
    return 0;
}
