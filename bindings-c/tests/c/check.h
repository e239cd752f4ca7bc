/* Tiny assertion helpers shared by the C tests of the fmi C API. */
#ifndef FMI_TEST_CHECK_H
#define FMI_TEST_CHECK_H

#include <fmi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks_run = 0;

/* The call must return `expected`; on failure print both statuses and fmi_last_error(). */
#define EXPECT_STATUS(call, expected)                                                      \
    do {                                                                                   \
        fmi_status got_ = (call);                                                          \
        checks_run++;                                                                      \
        if (got_ != (expected)) {                                                          \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: %s)\n",       \
                    __FILE__, __LINE__, #call, fmi_status_name(got_),                      \
                    fmi_status_name(expected), fmi_last_error());                          \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#define OK(call) EXPECT_STATUS(call, FMI_OK)

/* fmi_last_error() must contain `needle`. */
#define EXPECT_ERROR_MENTIONS(needle)                                                      \
    do {                                                                                   \
        checks_run++;                                                                      \
        if (strstr(fmi_last_error(), (needle)) == NULL) {                                  \
            fprintf(stderr, "%s:%d: last error \"%s\" does not mention \"%s\"\n",          \
                    __FILE__, __LINE__, fmi_last_error(), (needle));                       \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#define EXPECT(cond)                                                                       \
    do {                                                                                   \
        checks_run++;                                                                      \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);            \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#endif
