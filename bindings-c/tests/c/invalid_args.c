/*
 * Invalid arguments return status codes and set fmi_last_error(); nothing crashes. Runs as a
 * plain program (no launcher): single-rank jobs, and an in-process world of two ranks on two
 * threads for the errors that need a peer. Prints "invalid_args ok (K checks)".
 */
#include "check.h"

#include <pthread.h>
#include <stdint.h>

static void noop_op(const void *in, void *inout, size_t count, fmi_datatype dt, void *user) {
    (void)in, (void)inout, (void)count, (void)dt, (void)user;
}

static void init_errors(void) {
    fmi_comm *comm = (fmi_comm *)&comm; /* must be reset to NULL on failure */
    EXPECT_STATUS(fmi_init_from_env(NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_init_from_env(&comm), FMI_ERR_CONFIG); /* no FMI_* variables here */
    EXPECT_ERROR_MENTIONS("FMI_");
    EXPECT(comm == NULL);
    EXPECT_STATUS(fmi_init(-1, 2, "job", NULL, NULL, NULL, &comm), FMI_ERR_INVALID_RANK);
    EXPECT_STATUS(fmi_init(2, 2, "job", NULL, NULL, NULL, &comm), FMI_ERR_INVALID_RANK);
    EXPECT_STATUS(fmi_init(0, 0, "job", NULL, NULL, NULL, &comm), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_init(0, 1, NULL, NULL, NULL, NULL, &comm), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("fmi_init: job is NULL");
    EXPECT_STATUS(fmi_init(0, 1, "a/b", NULL, NULL, NULL, &comm), FMI_ERR_CONFIG);
    EXPECT_ERROR_MENTIONS("job id");
    EXPECT_STATUS(fmi_init(0, 1, "job", "/nonexistent/fmi.toml", NULL, NULL, &comm), FMI_ERR_CONFIG);
    EXPECT(comm == NULL);
    EXPECT_STATUS(fmi_init(0, 1, "job", NULL, NULL, NULL, NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_local_world(0, &comm), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_local_world(2, NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_finalize(NULL), FMI_ERR_INVALID_ARGUMENT);
}

static void null_comm(void) {
    int i = 0;
    size_t n = 0;
    fmi_request *req = NULL;
    EXPECT_STATUS(fmi_comm_rank(NULL, &i), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("fmi_comm_rank: comm is NULL");
    EXPECT_STATUS(fmi_comm_size(NULL, &i), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_comm_set_deadline(NULL, 10), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_send(NULL, &i, 1, FMI_INT32, 0, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_recv(NULL, &i, 1, FMI_INT32, 0, 0, &n), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_sendrecv(NULL, &i, 1, FMI_INT32, 0, 0, &i, 1, FMI_INT32, 0, 0, &n),
                  FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_isend(NULL, &i, 1, FMI_INT32, 0, 0, &req), FMI_ERR_INVALID_ARGUMENT);
    EXPECT(req == NULL);
    EXPECT_STATUS(fmi_irecv(NULL, &i, 1, FMI_INT32, 0, 0, &req), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_barrier(NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("fmi_barrier: comm is NULL");
    EXPECT_STATUS(fmi_bcast(NULL, &i, 1, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_gather(NULL, &i, &i, 1, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_gatherv(NULL, &i, 1, &i, &n, NULL, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_scatter(NULL, &i, &i, 1, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_scatterv(NULL, &i, &n, NULL, &i, 1, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_allgather(NULL, &i, &i, 1, FMI_INT32), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_allgatherv(NULL, &i, 1, &i, &n, NULL, FMI_INT32), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_alltoall(NULL, &i, &i, 1, FMI_INT32), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_alltoallv(NULL, &i, &n, NULL, &i, &n, NULL, FMI_INT32), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_reduce(NULL, &i, &i, 1, FMI_INT32, FMI_SUM, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_allreduce(NULL, &i, &i, 1, FMI_INT32, FMI_SUM), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_reduce_scatter_block(NULL, &i, &i, 1, FMI_INT32, FMI_SUM), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_scan(NULL, &i, &i, 1, FMI_INT32, FMI_SUM), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_exscan(NULL, &i, &i, 1, FMI_INT32, FMI_SUM), FMI_ERR_INVALID_ARGUMENT);
}

/* Argument errors on a real single-rank job (no rendezvous needed for one rank). */
static void single_rank(void) {
    fmi_comm *comm = NULL;
    OK(fmi_init(0, 1, "solo", NULL, NULL, NULL, &comm));
    int rank = -1, size = -1;
    OK(fmi_comm_rank(comm, &rank));
    OK(fmi_comm_size(comm, &size));
    EXPECT(rank == 0 && size == 1);
    EXPECT_STATUS(fmi_comm_rank(comm, NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_comm_set_deadline(comm, 0), FMI_ERR_INVALID_ARGUMENT);

    int32_t x[4] = {1, 2, 3, 4}, y[4] = {0};
    size_t n = 0;
    /* NULL buffers: an error with a count, fine without */
    EXPECT_STATUS(fmi_send(comm, NULL, 1, FMI_INT32, 0, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("fmi_send: buf is NULL but its count is 1");
    EXPECT_STATUS(fmi_allreduce(comm, x, NULL, 4, FMI_INT32, FMI_SUM), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("recvbuf is NULL");
    EXPECT_STATUS(fmi_bcast(comm, NULL, 3, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    OK(fmi_allreduce(comm, NULL, NULL, 0, FMI_INT32, FMI_SUM));
    OK(fmi_bcast(comm, NULL, 0, FMI_INT32, 0));
    /* datatypes */
    EXPECT_STATUS(fmi_send(comm, x, 1, 0, 0, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("datatype 0 is not an fmi_datatype");
    EXPECT_STATUS(fmi_allreduce(comm, x, y, 1, 99, FMI_SUM), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_recv(comm, y, 1, -3, 0, 0, &n), FMI_ERR_INVALID_ARGUMENT);
    /* ranks and tags */
    EXPECT_STATUS(fmi_send(comm, x, 1, FMI_INT32, 1, 0), FMI_ERR_INVALID_RANK);
    EXPECT_ERROR_MENTIONS("dst 1 is not in this job of 1 ranks");
    EXPECT_STATUS(fmi_recv(comm, y, 1, FMI_INT32, -1, 0, &n), FMI_ERR_INVALID_RANK);
    EXPECT_STATUS(fmi_gather(comm, x, y, 1, FMI_INT32, 5), FMI_ERR_INVALID_RANK);
    EXPECT_STATUS(fmi_reduce(comm, x, y, 1, FMI_INT32, FMI_SUM, -2), FMI_ERR_INVALID_RANK);
    EXPECT_STATUS(fmi_send(comm, x, 1, FMI_INT32, 0, -1), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("tag -1 is negative");
    /* misaligned and oversized buffers */
    EXPECT_STATUS(fmi_send(comm, (char *)x + 1, 1, FMI_INT32, 0, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("not aligned");
    EXPECT_STATUS(fmi_allgather(comm, x, y, SIZE_MAX / 2, FMI_INT32), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("too large");
    /* ops */
    double d = 1.5, e = 0;
    EXPECT_STATUS(fmi_allreduce(comm, x, y, 1, FMI_INT32, NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("op is NULL");
    EXPECT_STATUS(fmi_allreduce(comm, &d, &e, 1, FMI_FLOAT64, FMI_BXOR), FMI_ERR_UNSUPPORTED_OP);
    EXPECT_STATUS(fmi_allreduce(comm, x, y, 1, FMI_BYTE, FMI_SUM), FMI_ERR_UNSUPPORTED_OP);
    EXPECT_ERROR_MENTIONS("FMI_BYTE");
    fmi_op *op = NULL;
    EXPECT_STATUS(fmi_op_create(NULL, NULL, 1, &op), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_op_create(noop_op, NULL, 1, NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_op_free((fmi_op **)NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_op_free(&op), FMI_ERR_INVALID_ARGUMENT); /* op is NULL */
    fmi_op *builtin = (fmi_op *)FMI_SUM;
    EXPECT_STATUS(fmi_op_free(&builtin), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("built-in op sum cannot be freed");
    OK(fmi_op_create(noop_op, NULL, 1, &op));
    OK(fmi_op_free(&op));
    EXPECT(op == NULL);
    /* counts that do not match */
    size_t counts[1] = {2};
    EXPECT_STATUS(fmi_gatherv(comm, x, 3, y, counts, NULL, FMI_INT32, 0), FMI_ERR_COUNT_MISMATCH);
    EXPECT_STATUS(fmi_gatherv(comm, x, 3, y, NULL, NULL, FMI_INT32, 0), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("recvcounts is NULL");
    EXPECT_STATUS(fmi_scatterv(comm, x, counts, NULL, y, 3, FMI_INT32, 0), FMI_ERR_COUNT_MISMATCH);
    /* requests */
    fmi_request *req = NULL;
    int flag = 7;
    EXPECT_STATUS(fmi_wait(NULL, &n), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_wait(&req, &n), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("already completed or freed");
    EXPECT_STATUS(fmi_test(&req, NULL, &n), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_test(&req, &flag, &n), FMI_ERR_INVALID_ARGUMENT);
    EXPECT(flag == 0);
    EXPECT_STATUS(fmi_request_free(&req), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_isend(comm, x, 1, FMI_INT32, 0, 0, NULL), FMI_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(fmi_irecv(comm, NULL, 4, FMI_INT32, 0, 0, &req), FMI_ERR_INVALID_ARGUMENT);
    EXPECT(req == NULL);
    /* a self-message through isend/irecv still works after all of that */
    OK(fmi_isend(comm, x, 4, FMI_INT32, 0, 3, &req));
    OK(fmi_request_free(&req));
    EXPECT(req == NULL);
    OK(fmi_irecv(comm, y, 4, FMI_INT32, 0, 3, &req));
    OK(fmi_wait(&req, &n));
    EXPECT(n == 4 && y[3] == 4);
    OK(fmi_finalize(comm));
}

/* Two ranks of an in-process world on two threads. */
static fmi_comm *world[2];

static void *rank1(void *arg) {
    (void)arg;
    int32_t v[3] = {7, 8, 9};
    OK(fmi_send(world[1], v, 3, FMI_INT32, 0, 1));
    OK(fmi_barrier(world[1]));
    return NULL;
}

static void two_ranks(void) {
    OK(fmi_local_world(2, world));
    pthread_t t;
    EXPECT(pthread_create(&t, NULL, rank1, NULL) == 0);
    int32_t buf[2];
    size_t n = 0;
    EXPECT_STATUS(fmi_recv(world[0], buf, 2, FMI_INT32, 1, 1, &n), FMI_ERR_COUNT_MISMATCH);
    EXPECT_ERROR_MENTIONS("expected 2 elements, got 3 (from rank 1)");
    OK(fmi_barrier(world[0]));
    EXPECT(pthread_join(t, NULL) == 0);
    OK(fmi_comm_set_deadline(world[0], 200));
    EXPECT_STATUS(fmi_recv(world[0], buf, 2, FMI_INT32, 1, 2, &n), FMI_ERR_TIMEOUT);
    EXPECT_ERROR_MENTIONS("waiting for rank 1");
    OK(fmi_finalize(world[0]));
    OK(fmi_finalize(world[1]));
}

int main(void) {
    EXPECT(strlen(fmi_version()) > 0);
    EXPECT(strcmp(fmi_last_error(), "") == 0);
    EXPECT(strcmp(fmi_status_name(FMI_ERR_TIMEOUT), "FMI_ERR_TIMEOUT") == 0);
    EXPECT(strcmp(fmi_status_name(1000), "FMI_ERR_UNKNOWN") == 0);
    init_errors();
    null_comm();
    single_rank();
    two_ranks();
    printf("invalid_args ok (%d checks)\n", checks_run);
    return 0;
}
