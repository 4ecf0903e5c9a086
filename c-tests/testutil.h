/* Shared helpers of the C tests: checks, a temporary raw image, and the
 * source-integrity fingerprint (FNV-1a of the bytes plus the mtime). */
#ifndef COWDISK_TESTUTIL_H
#define COWDISK_TESTUTIL_H

#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int tu_failures = 0;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            tu_failures++;                                                   \
        }                                                                    \
    } while (0)

#define CHECK_EQ_U64(a, b)                                                    \
    do {                                                                      \
        uint64_t tu_a = (uint64_t)(a), tu_b = (uint64_t)(b);                  \
        if (tu_a != tu_b) {                                                   \
            fprintf(stderr, "%s:%d: %s == %llu, expected %s == %llu\n",       \
                    __FILE__, __LINE__, #a, (unsigned long long)tu_a, #b,     \
                    (unsigned long long)tu_b);                                \
            tu_failures++;                                                    \
        }                                                                     \
    } while (0)

static inline int tu_finish(const char *name)
{
    if (tu_failures) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, tu_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

/* Writes `size` bytes from `data` to a fresh temporary file; returns its
 * path in `path` (at least 64 bytes). */
static inline int tu_write_temp(char *path, const unsigned char *data, size_t size)
{
    const char *dir = getenv("TMPDIR");
    FILE *f;
    int fd;
    snprintf(path, 64, "%s/cowdisk-ctest-XXXXXX", dir ? dir : "/tmp");
    fd = mkstemp(path);
    if (fd < 0) return 0;
    f = fdopen(fd, "wb");
    if (!f) { close(fd); return 0; }
    if (fwrite(data, 1, size, f) != size) { fclose(f); return 0; }
    return fclose(f) == 0;
}

typedef struct {
    uint64_t hash;
    uint64_t size;
    long mtime_sec;
    long mtime_nsec;
} tu_fingerprint;

static inline tu_fingerprint tu_fingerprint_of(const char *path)
{
    tu_fingerprint fp;
    struct stat st;
    FILE *f = fopen(path, "rb");
    int c;
    memset(&fp, 0, sizeof fp);
    fp.hash = 0xcbf29ce484222325ULL;
    if (f) {
        while ((c = fgetc(f)) != EOF) {
            fp.hash ^= (uint64_t)(unsigned char)c;
            fp.hash *= 0x100000001b3ULL;
            fp.size++;
        }
        fclose(f);
    }
    if (stat(path, &st) == 0) {
        fp.mtime_sec = (long)st.st_mtim.tv_sec;
        fp.mtime_nsec = (long)st.st_mtim.tv_nsec;
    }
    return fp;
}

static inline int tu_same_fingerprint(tu_fingerprint a, tu_fingerprint b)
{
    return a.hash == b.hash && a.size == b.size && a.mtime_sec == b.mtime_sec &&
           a.mtime_nsec == b.mtime_nsec;
}

#endif
