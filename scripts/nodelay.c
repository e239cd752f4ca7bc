/*
 * LD_PRELOAD shim for the local test servers: sets TCP_NODELAY on every accepted TCP socket.
 *
 * s3s-fs 0.14.1 writes an HTTP response's headers and its body with two writes and leaves
 * Nagle's algorithm on, so the body waits for the client's ACK of the headers, which the client
 * delays (it is waiting for the body): up to 40 ms per GET on Linux. Real S3 does not behave
 * like that, and the stall made every local S3 measurement bimodal (docs/benchmarks.md, "Model").
 * scripts/services.sh builds this file with the system C compiler and preloads it into s3s-fs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd)
{
    int one = 1;
    if (fd >= 0) {
        /* Fails harmlessly (ENOPROTOOPT, ENOTSOCK) on anything that is not TCP. */
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) {
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    }
    int c = real(fd, addr, len);
    nodelay(c);
    return c;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) {
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    }
    int c = real(fd, addr, len, flags);
    nodelay(c);
    return c;
}
