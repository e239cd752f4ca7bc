/*
 * Every point-to-point call and collective of the C API, checked against values computed by
 * hand, plus the errors that need a peer. Run under `fmi run -n N` (N from 2 to 8).
 * Prints "rank R/N: collectives ok (K checks)" and exits 0 when everything matched.
 */
#include "check.h"

#include <stdint.h>

static int r, p;

static int64_t concat_digits(int64_t a, int64_t b) {
    int64_t scale = 1;
    for (int64_t x = b; x > 0; x /= 10) scale *= 10;
    return a * scale + b;
}

/* A non-commutative (but associative) op: decimal concatenation, inout = in . inout. */
static void concat_op(const void *in, void *inout, size_t count, fmi_datatype dt, void *user) {
    (void)user;
    if (dt != FMI_INT64) abort();
    const int64_t *a = in;
    int64_t *b = inout;
    for (size_t i = 0; i < count; i++) b[i] = concat_digits(a[i], b[i]);
}

/* A commutative op using user_data: sum modulo *(int32_t*)user. */
static void sum_mod_op(const void *in, void *inout, size_t count, fmi_datatype dt, void *user) {
    if (dt != FMI_INT32) abort();
    const int32_t *a = in;
    int32_t *b = inout;
    int32_t m = *(const int32_t *)user;
    for (size_t i = 0; i < count; i++) b[i] = (a[i] + b[i]) % m;
}

static int64_t concat_range(int from, int to) { /* digits from+1 .. to, e.g. 1234 */
    int64_t v = 0;
    for (int s = from; s < to; s++) v = concat_digits(v, s + 1);
    return v;
}

static void point_to_point(fmi_comm *comm) {
    int right = (r + 1) % p, left = (r + p - 1) % p;
    size_t got = 0;

    /* sendrecv around the ring */
    int32_t out = r * 7, in = -1;
    OK(fmi_sendrecv(comm, &out, 1, FMI_INT32, right, 5, &in, 1, FMI_INT32, left, 5, &got));
    EXPECT(got == 1 && in == left * 7);

    /* isend/irecv around the ring, completed with fmi_test then fmi_wait */
    double sendv[4], recvv[8];
    for (int i = 0; i < 4; i++) sendv[i] = r + i * 0.25;
    fmi_request *rreq = NULL, *sreq = NULL;
    OK(fmi_irecv(comm, recvv, 8, FMI_FLOAT64, left, 6, &rreq));
    OK(fmi_isend(comm, sendv, 4, FMI_FLOAT64, right, 6, &sreq));
    sendv[0] = -99; /* isend copied the buffer */
    int flag = 0;
    fmi_status polled = FMI_OK;
    while (!flag && polled == FMI_OK) polled = fmi_test(&rreq, &flag, &got);
    OK(polled);
    EXPECT(rreq == NULL && got == 4);
    for (int i = 0; i < 4; i++) EXPECT(recvv[i] == left + i * 0.25);
    OK(fmi_wait(&sreq, &got));
    EXPECT(sreq == NULL && got == 0);

    /* plain send/recv, zero-length messages too */
    if (r == 0) {
        int16_t msg[3] = {1, 2, 3};
        OK(fmi_send(comm, msg, 3, FMI_INT16, 1, 7));
        OK(fmi_send(comm, NULL, 0, FMI_INT16, 1, 7));
    } else if (r == 1) {
        int16_t msg[3] = {0};
        OK(fmi_recv(comm, msg, 3, FMI_INT16, 0, 7, &got));
        EXPECT(got == 3 && msg[0] == 1 && msg[2] == 3);
        OK(fmi_recv(comm, msg, 3, FMI_INT16, 0, 7, &got));
        EXPECT(got == 0);
    }
}

static void rooted(fmi_comm *comm) {
    /* bcast from the last rank */
    int32_t b[5];
    for (int i = 0; i < 5; i++) b[i] = r == p - 1 ? 100 + i : -1;
    OK(fmi_bcast(comm, b, 5, FMI_INT32, p - 1));
    for (int i = 0; i < 5; i++) EXPECT(b[i] == 100 + i);

    /* gather at rank 1 */
    int root = 1 % p;
    int32_t gs[3] = {r * 10, r * 10 + 1, r * 10 + 2}, gr[3 * 8];
    OK(fmi_gather(comm, gs, r == root ? gr : NULL, 3, FMI_INT32, root));
    if (r == root)
        for (int s = 0; s < p; s++)
            for (int j = 0; j < 3; j++) EXPECT(gr[s * 3 + j] == s * 10 + j);

    /* gatherv at rank 0, blocks of r+1 placed in reverse rank order */
    int64_t vs[8], vr[64];
    size_t counts[8], displs[8], at = 0;
    for (int j = 0; j <= r; j++) vs[j] = r * 100 + j;
    for (int s = p - 1; s >= 0; s--) {
        counts[s] = (size_t)s + 1;
        displs[s] = at;
        at += counts[s];
    }
    OK(fmi_gatherv(comm, vs, (size_t)r + 1, vr, counts, displs, FMI_INT64, 0));
    if (r == 0)
        for (int s = 0; s < p; s++)
            for (int j = 0; j <= s; j++) EXPECT(vr[displs[s] + j] == s * 100 + j);

    /* scatter from rank 0 */
    double ss[2 * 8], sr[2];
    for (int i = 0; i < 2 * p; i++) ss[i] = i + 0.5;
    OK(fmi_scatter(comm, r == 0 ? ss : NULL, sr, 2, FMI_FLOAT64, 0));
    EXPECT(sr[0] == r * 2 + 0.5 && sr[1] == r * 2 + 1.5);

    /* scatterv from the last rank: rank s gets s elements, stored in reverse order at root */
    int32_t svs[64], svr[8];
    at = 0;
    for (int s = p - 1; s >= 0; s--) {
        counts[s] = (size_t)s;
        displs[s] = at;
        for (int j = 0; j < s; j++) svs[at + (size_t)j] = 1000 * s + j;
        at += counts[s];
    }
    OK(fmi_scatterv(comm, svs, counts, displs, svr, (size_t)r, FMI_INT32, p - 1));
    for (int j = 0; j < r; j++) EXPECT(svr[j] == 1000 * r + j);

    /* reduce (sum) at rank p/2 */
    int32_t rs[4], rr[4] = {0};
    for (int i = 0; i < 4; i++) rs[i] = r + i;
    OK(fmi_reduce(comm, rs, rr, 4, FMI_INT32, FMI_SUM, p / 2));
    if (r == p / 2)
        for (int i = 0; i < 4; i++) EXPECT(rr[i] == p * i + p * (p - 1) / 2);
}

static void all_to_all(fmi_comm *comm) {
    /* allgather */
    uint16_t as[2] = {(uint16_t)r, (uint16_t)(r + 100)}, ar[16];
    OK(fmi_allgather(comm, as, ar, 2, FMI_UINT16));
    for (int s = 0; s < p; s++) EXPECT(ar[2 * s] == s && ar[2 * s + 1] == s + 100);

    /* allgatherv, packed (NULL displacements) */
    int8_t gvs[8], gvr[64];
    size_t counts[8], displs[8], at = 0;
    for (int j = 0; j <= r; j++) gvs[j] = (int8_t)r;
    for (int s = 0; s < p; s++) counts[s] = (size_t)s + 1;
    OK(fmi_allgatherv(comm, gvs, (size_t)r + 1, gvr, counts, NULL, FMI_INT8));
    for (int s = 0; s < p; s++)
        for (int j = 0; j <= s; j++) EXPECT(gvr[at++] == s);

    /* alltoall */
    int64_t ts[16], tr[16];
    for (int d = 0; d < p; d++) {
        ts[2 * d] = r * 1000 + d * 10;
        ts[2 * d + 1] = r * 1000 + d * 10 + 1;
    }
    OK(fmi_alltoall(comm, ts, tr, 2, FMI_INT64));
    for (int s = 0; s < p; s++) EXPECT(tr[2 * s] == s * 1000 + r * 10 && tr[2 * s + 1] == tr[2 * s] + 1);

    /* alltoallv: (s + d) % 3 elements from s to d, received in reverse order */
    uint32_t vs[32], vr[32];
    size_t scounts[8], rcounts[8], rdispls[8];
    at = 0;
    for (int d = 0; d < p; d++) {
        scounts[d] = (size_t)((r + d) % 3);
        for (size_t j = 0; j < scounts[d]; j++) vs[at++] = (uint32_t)(r * 100 + d * 10) + (uint32_t)j;
    }
    at = 0;
    for (int s = p - 1; s >= 0; s--) {
        rcounts[s] = (size_t)((s + r) % 3);
        rdispls[s] = at;
        at += rcounts[s];
    }
    OK(fmi_alltoallv(comm, vs, scounts, NULL, vr, rcounts, rdispls, FMI_UINT32));
    for (int s = 0; s < p; s++)
        for (size_t j = 0; j < rcounts[s]; j++)
            EXPECT(vr[rdispls[s] + j] == (uint32_t)(s * 100 + r * 10) + (uint32_t)j);
    (void)displs;
}

static void reductions(fmi_comm *comm) {
    /* every built-in op */
    int64_t prod_in = r + 2, prod = 0, expect_prod = 1;
    for (int s = 0; s < p; s++) expect_prod *= s + 2;
    OK(fmi_allreduce(comm, &prod_in, &prod, 1, FMI_INT64, FMI_PROD));
    EXPECT(prod == expect_prod);

    float f = (float)r - 1.5f, fmin = 0, fmax = 0;
    OK(fmi_allreduce(comm, &f, &fmin, 1, FMI_FLOAT32, FMI_MIN));
    OK(fmi_allreduce(comm, &f, &fmax, 1, FMI_FLOAT32, FMI_MAX));
    EXPECT(fmin == -1.5f && fmax == (float)(p - 1) - 1.5f);

    uint8_t odd = (uint8_t)(r % 2), land = 9, lor = 9, lxor = 9;
    OK(fmi_allreduce(comm, &odd, &land, 1, FMI_UINT8, FMI_LAND));
    OK(fmi_allreduce(comm, &odd, &lor, 1, FMI_UINT8, FMI_LOR));
    OK(fmi_allreduce(comm, &odd, &lxor, 1, FMI_UINT8, FMI_LXOR));
    EXPECT(land == 0 && lor == (p > 1) && lxor == (p / 2) % 2);

    uint32_t bits = (1u << r) | 0x100u, band = 0, bor = 0, bxor = 0;
    uint32_t all = (1u << p) - 1u;
    OK(fmi_allreduce(comm, &bits, &band, 1, FMI_UINT32, FMI_BAND));
    OK(fmi_allreduce(comm, &bits, &bor, 1, FMI_UINT32, FMI_BOR));
    OK(fmi_allreduce(comm, &bits, &bxor, 1, FMI_UINT32, FMI_BXOR));
    EXPECT(band == 0x100u && bor == (all | 0x100u) && bxor == (all | (p % 2 ? 0x100u : 0)));

    unsigned char byte = (unsigned char)(1u << r), bytes_xor = 0;
    OK(fmi_allreduce(comm, &byte, &bytes_xor, 1, FMI_BYTE, FMI_BXOR));
    EXPECT(bytes_xor == (unsigned char)all);

    /* in place: the same buffer as input and output */
    int32_t inplace[3] = {r, 1, -r};
    OK(fmi_allreduce(comm, inplace, inplace, 3, FMI_INT32, FMI_SUM));
    EXPECT(inplace[0] == p * (p - 1) / 2 && inplace[1] == p && inplace[2] == -p * (p - 1) / 2);

    /* reduce_scatter_block */
    double rsb[16], mine[2];
    for (int i = 0; i < 2 * p; i++) rsb[i] = r + i;
    OK(fmi_reduce_scatter_block(comm, rsb, mine, 2, FMI_FLOAT64, FMI_SUM));
    for (int j = 0; j < 2; j++) EXPECT(mine[j] == p * (r * 2 + j) + p * (p - 1) / 2.0);

    /* scan and exscan */
    int32_t one = r + 1, scan = 0, exscan = -7;
    OK(fmi_scan(comm, &one, &scan, 1, FMI_INT32, FMI_SUM));
    EXPECT(scan == (r + 1) * (r + 2) / 2);
    OK(fmi_exscan(comm, &one, r == 0 ? NULL : &exscan, 1, FMI_INT32, FMI_SUM));
    EXPECT(r == 0 ? exscan == -7 : exscan == r * (r + 1) / 2);

    /* a non-commutative user op keeps rank order everywhere */
    fmi_op *concat = NULL;
    OK(fmi_op_create(concat_op, NULL, 0, &concat));
    int64_t digit = r + 1, joined = 0;
    OK(fmi_allreduce(comm, &digit, &joined, 1, FMI_INT64, concat));
    EXPECT(joined == concat_range(0, p));
    OK(fmi_reduce(comm, &digit, &joined, 1, FMI_INT64, concat, 0));
    if (r == 0) EXPECT(joined == concat_range(0, p));
    OK(fmi_scan(comm, &digit, &joined, 1, FMI_INT64, concat));
    EXPECT(joined == concat_range(0, r + 1));
    joined = -1;
    OK(fmi_exscan(comm, &digit, &joined, 1, FMI_INT64, concat));
    EXPECT(r == 0 ? joined == -1 : joined == concat_range(0, r));
    OK(fmi_op_free(&concat));
    EXPECT(concat == NULL);

    /* a commutative user op with user data */
    int32_t modulus = 7, v = r + 1, res = 0;
    fmi_op *summod = NULL;
    OK(fmi_op_create(sum_mod_op, &modulus, 1, &summod));
    OK(fmi_allreduce(comm, &v, &res, 1, FMI_INT32, summod));
    EXPECT(res == (p * (p + 1) / 2) % 7);
    OK(fmi_op_free(&summod));
}

static void errors_with_peers(fmi_comm *comm) {
    size_t got = 99;
    /* a message longer than the buffer, and one that is not whole int32s */
    if (r == 0) {
        int32_t five[5] = {1, 2, 3, 4, 5};
        unsigned char three[3] = {1, 2, 3};
        OK(fmi_send(comm, five, 5, FMI_INT32, 1, 8));
        OK(fmi_send(comm, three, 3, FMI_BYTE, 1, 8));
        OK(fmi_send(comm, three, 3, FMI_BYTE, 1, 8));
    } else if (r == 1) {
        int32_t two[2], four[4];
        EXPECT_STATUS(fmi_recv(comm, two, 2, FMI_INT32, 0, 8, &got), FMI_ERR_COUNT_MISMATCH);
        EXPECT_ERROR_MENTIONS("fmi_recv: rank 1");
        EXPECT_STATUS(fmi_recv(comm, four, 4, FMI_INT32, 0, 8, &got), FMI_ERR_TYPE_MISMATCH);
        EXPECT_ERROR_MENTIONS("from rank 0");
        fmi_request *req = NULL;
        OK(fmi_irecv(comm, four, 4, FMI_INT32, 0, 8, &req));
        EXPECT_STATUS(fmi_wait(&req, &got), FMI_ERR_TYPE_MISMATCH);
        EXPECT(req == NULL);

        /* nobody sends on tag 99: a short deadline turns that into a timeout naming rank 0 */
        OK(fmi_comm_set_deadline(comm, 300));
        EXPECT_STATUS(fmi_recv(comm, four, 4, FMI_INT32, 0, 99, &got), FMI_ERR_TIMEOUT);
        EXPECT_ERROR_MENTIONS("waiting for rank 0");
        OK(fmi_comm_set_deadline(comm, 60000));
    }
    /* errors found before any message moves are the same on every rank */
    double d = 1.0, out = 0;
    EXPECT_STATUS(fmi_allreduce(comm, &d, &out, 1, FMI_FLOAT64, FMI_BAND), FMI_ERR_UNSUPPORTED_OP);
    EXPECT_ERROR_MENTIONS("band");
    EXPECT_STATUS(fmi_bcast(comm, &d, 1, FMI_FLOAT64, p), FMI_ERR_INVALID_RANK);
    EXPECT_STATUS(fmi_send(comm, &d, 1, FMI_FLOAT64, -1, 0), FMI_ERR_INVALID_RANK);
}

int main(void) {
    fmi_comm *comm = NULL;
    OK(fmi_init_from_env(&comm));
    OK(fmi_comm_rank(comm, &r));
    OK(fmi_comm_size(comm, &p));
    if (p < 2 || p > 8) {
        fprintf(stderr, "run with 2 to 8 ranks\n");
        return 2;
    }
    point_to_point(comm);
    rooted(comm);
    all_to_all(comm);
    reductions(comm);
    errors_with_peers(comm);
    OK(fmi_barrier(comm));
    printf("rank %d/%d: collectives ok (%d checks)\n", r, p, checks_run);
    OK(fmi_finalize(comm));
    return 0;
}
