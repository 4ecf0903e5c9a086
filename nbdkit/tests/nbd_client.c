/* The test client of the nbdkit plugin: drives an NBD export with libnbd
 * and keeps a model of what the disk must hold - a plain byte array that
 * every write, zero and trim is applied to by hand, independently of the
 * plugin and the library - then compares. Also reopens a store with the C
 * API after the server is gone and compares it with the model.
 *
 *   nbd_client write URI MODEL SEED OPS [--no-flush]
 *       random writes, zeroes and trims (aligned, unaligned, sub-sector),
 *       each read back against the model; MODEL (a raw file holding what the
 *       export showed before) is rewritten with the final model; the whole
 *       export is compared at the end; then a flush unless --no-flush.
 *   nbd_client scatter URI MODEL SEED COUNT
 *       COUNT sector-aligned writes, each to sectors no other one touches,
 *       and no flush (for a crash test: every sector then holds the state
 *       before, or its one write); MODEL is rewritten with the writes.
 *   nbd_client concurrent URI MODEL SEED THREADS OPS
 *       THREADS connections at once, each writing, zeroing and reading its
 *       own byte range (the ranges meet inside sectors, and each also
 *       writes its part of those shared sectors over and over, so the
 *       plugin's read-modify-write is raced); then the whole export
 *       against MODEL.
 *   nbd_client check-store SOURCE STORE MODEL [MODEL_AFTER] [--follow-parents]
 *       opens STORE over SOURCE with COW_OpenCowOverlay (read-only) and
 *       checks every sector equals MODEL's, or MODEL_AFTER's (writes that
 *       were acknowledged but not flushed may or may not be there), and
 *       that the store is consistent.
 *
 * Trims are modelled as the plugin documents them (docs/NBD.md): the whole
 * sectors inside the range read as zeros afterwards, partial sectors keep
 * their bytes. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "cowdisk.h"

#define SECTOR 512u

/* Counted under a lock: the concurrent mode fails from several threads. */
static int failures;
static pthread_mutex_t failures_lock = PTHREAD_MUTEX_INITIALIZER;

#define FAIL(...)                                                             \
    do {                                                                      \
        pthread_mutex_lock(&failures_lock);                                   \
        fprintf(stderr, "nbd_client: " __VA_ARGS__);                          \
        fputc('\n', stderr);                                                  \
        failures++;                                                           \
        pthread_mutex_unlock(&failures_lock);                                 \
    } while (0)

static int failure_count(void)
{
    int n;
    pthread_mutex_lock(&failures_lock);
    n = failures;
    pthread_mutex_unlock(&failures_lock);
    return n;
}

static uint64_t next_random(uint64_t *state)
{
    /* xorshift64* */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t below(uint64_t *state, uint64_t n) { return n ? next_random(state) % n : 0; }

static unsigned char *load_file(const char *path, uint64_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *data;
    long len;
    if (!f) { perror(path); return NULL; }
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        perror(path);
        fclose(f);
        return NULL;
    }
    data = malloc((size_t)len + 1);
    if (!data || fread(data, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "%s: cannot read\n", path);
        free(data);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *size = (uint64_t)len;
    return data;
}

static int save_file(const char *path, const unsigned char *data, uint64_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, (size_t)size, f) != (size_t)size) {
        perror(path);
        if (f) fclose(f);
        return -1;
    }
    return fclose(f);
}

static struct nbd_handle *connect_to(const char *uri)
{
    struct nbd_handle *nbd = nbd_create();
    if (!nbd || nbd_connect_uri(nbd, uri) == -1) {
        fprintf(stderr, "nbd_client: connect %s: %s\n", uri, nbd_get_error());
        if (nbd) nbd_close(nbd);
        return NULL;
    }
    return nbd;
}

/* Compares the whole export with the model, in 1 MiB reads. */
static void compare_export(struct nbd_handle *nbd, const unsigned char *model, uint64_t size)
{
    static unsigned char buf[1 << 20];
    uint64_t at;
    for (at = 0; at < size; at += sizeof buf) {
        uint64_t n = size - at < sizeof buf ? size - at : sizeof buf;
        if (nbd_pread(nbd, buf, n, at, 0) == -1) {
            FAIL("read at %" PRIu64 ": %s", at, nbd_get_error());
            return;
        }
        if (memcmp(buf, model + at, n) != 0) {
            uint64_t i = 0;
            while (buf[i] == model[at + i]) i++;
            FAIL("the export differs from the model at byte %" PRIu64, at + i);
            return;
        }
    }
}

/* Applies a trim to the model: whole sectors inside [off, off+len) zero. */
static void model_trim(unsigned char *model, uint64_t off, uint64_t len)
{
    uint64_t first = (off + SECTOR - 1) / SECTOR, last = (off + len) / SECTOR;
    if (first < last) memset(model + first * SECTOR, 0, (size_t)((last - first) * SECTOR));
}

/* One random operation inside [lo, hi) on `nbd`, applied to `model` too;
 * then a random read inside [lo, hi) checked against the model. */
static void random_op(struct nbd_handle *nbd, unsigned char *model, uint64_t lo, uint64_t hi,
                      uint64_t *rng, unsigned char *buf, size_t buf_size)
{
    uint64_t kind = below(rng, 100), off, len, i;
    int aligned = below(rng, 2) == 0;
    uint64_t span = hi - lo;
    uint64_t max_len = span < buf_size ? span : buf_size;

    if (aligned && span >= 2 * SECTOR) {
        uint64_t first = (lo + SECTOR - 1) / SECTOR, last = hi / SECTOR;
        uint64_t sectors = below(rng, (max_len / SECTOR) > 256 ? 256 : max_len / SECTOR) + 1;
        if (last <= first) return;
        if (sectors > last - first) sectors = last - first;
        off = (first + below(rng, last - first - sectors + 1)) * SECTOR;
        len = sectors * SECTOR;
    } else {
        len = below(rng, max_len < 3000 ? max_len : 3000) + 1;
        off = lo + below(rng, span - len + 1);
    }

    if (kind < 55) {
        unsigned char seed = (unsigned char)next_random(rng);
        for (i = 0; i < len; i++) buf[i] = (unsigned char)(seed + i * 7 + (i >> 9));
        if (nbd_pwrite(nbd, buf, len, off, 0) == -1)
            FAIL("write %" PRIu64 "+%" PRIu64 ": %s", off, len, nbd_get_error());
        else
            memcpy(model + off, buf, len);
    } else if (kind < 70) {
        /* zero, holes allowed (the plugin discards whole sectors) */
        if (nbd_zero(nbd, len, off, 0) == -1)
            FAIL("zero %" PRIu64 "+%" PRIu64 ": %s", off, len, nbd_get_error());
        else
            memset(model + off, 0, len);
    } else if (kind < 80) {
        if (nbd_zero(nbd, len, off, LIBNBD_CMD_FLAG_NO_HOLE) == -1)
            FAIL("zero (no hole) %" PRIu64 "+%" PRIu64 ": %s", off, len, nbd_get_error());
        else
            memset(model + off, 0, len);
    } else if (kind < 85) {
        /* A fast zero that would have to write zeros must fail with
         * ENOTSUP and change nothing; one the map can do must work. */
        int partial = off % SECTOR || len % SECTOR;
        int r = nbd_zero(nbd, len, off, LIBNBD_CMD_FLAG_FAST_ZERO | LIBNBD_CMD_FLAG_NO_HOLE);
        if (r != -1 || nbd_get_errno() != ENOTSUP)
            FAIL("fast zero without holes %" PRIu64 "+%" PRIu64 ": expected ENOTSUP, got %d (%s)",
                 off, len, r, r == -1 ? nbd_get_error() : "success");
        r = nbd_zero(nbd, len, off, LIBNBD_CMD_FLAG_FAST_ZERO);
        if (partial) {
            if (r != -1 || nbd_get_errno() != ENOTSUP)
                FAIL("fast zero of partial sectors %" PRIu64 "+%" PRIu64 ": expected ENOTSUP",
                     off, len);
        } else if (r == -1) {
            FAIL("fast zero %" PRIu64 "+%" PRIu64 ": %s", off, len, nbd_get_error());
        } else {
            memset(model + off, 0, len);
        }
    } else if (kind < 92) {
        if (nbd_trim(nbd, len, off, 0) == -1)
            FAIL("trim %" PRIu64 "+%" PRIu64 ": %s", off, len, nbd_get_error());
        else
            model_trim(model, off, len);
    } else {
        if (nbd_flush(nbd, 0) == -1) FAIL("flush: %s", nbd_get_error());
    }

    /* Read back a random range around the operation. */
    len = below(rng, max_len < 5000 ? max_len : 5000) + 1;
    off = lo + below(rng, span - len + 1);
    if (nbd_pread(nbd, buf, len, off, 0) == -1)
        FAIL("read %" PRIu64 "+%" PRIu64 ": %s", off, len, nbd_get_error());
    else if (memcmp(buf, model + off, len) != 0)
        FAIL("read %" PRIu64 "+%" PRIu64 " differs from the model", off, len);
}

static int run_write(int argc, char **argv)
{
    const char *uri, *model_path;
    uint64_t size, rng, ops, i;
    unsigned char *model, *buf;
    struct nbd_handle *nbd;
    int flush = 1;
    if (argc < 6) return 2;
    uri = argv[2];
    model_path = argv[3];
    rng = strtoull(argv[4], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    ops = strtoull(argv[5], NULL, 10);
    if (argc > 6 && strcmp(argv[6], "--no-flush") == 0) flush = 0;
    if (!(model = load_file(model_path, &size))) return 1;
    if (!(nbd = connect_to(uri))) return 1;
    if ((uint64_t)nbd_get_size(nbd) != size) {
        FAIL("export size %" PRId64 ", model %" PRIu64, nbd_get_size(nbd), size);
        return 1;
    }
    buf = malloc(256 * SECTOR + 8192);
    if (!buf) return 1;
    /* Fixed cases first: sub-sector writes at both ends of a sector, one
     * crossing a sector boundary, and the last bytes of the disk. */
    {
        static const struct { uint64_t off, len; } fixed[] = {
            {1, 10}, {500, 12}, {1000, 3000}, {513, 511}, {4096 - 7, 14},
        };
        size_t k;
        for (k = 0; k < sizeof fixed / sizeof fixed[0]; k++) {
            uint64_t off = fixed[k].off, len = fixed[k].len;
            for (i = 0; i < len; i++) buf[i] = (unsigned char)(0xC0 + k + i);
            if (nbd_pwrite(nbd, buf, len, off, 0) == -1) FAIL("write: %s", nbd_get_error());
            else memcpy(model + off, buf, len);
        }
        memset(buf, 0xEE, 100);
        if (nbd_pwrite(nbd, buf, 100, size - 100, 0) == -1) FAIL("write: %s", nbd_get_error());
        else memcpy(model + size - 100, buf, 100);
    }
    for (i = 0; i < ops; i++) random_op(nbd, model, 0, size, &rng, buf, 256 * SECTOR);
    compare_export(nbd, model, size);
    if (flush && nbd_flush(nbd, 0) == -1) FAIL("flush: %s", nbd_get_error());
    if (save_file(model_path, model, size) != 0) failures++;
    nbd_close(nbd);
    free(buf);
    free(model);
    printf("nbd_client write: %" PRIu64 " operations, %d failure(s)\n", ops, failures);
    return failures ? 1 : 0;
}

static int run_scatter(int argc, char **argv)
{
    /* Each write lands in its own cell of 128 sectors. */
    enum { CELL = 128 };
    const char *uri, *model_path;
    uint64_t size, rng, count, cells, i, j;
    unsigned char *model, buf[64 * SECTOR];
    struct nbd_handle *nbd;
    if (argc < 6) return 2;
    uri = argv[2];
    model_path = argv[3];
    rng = strtoull(argv[4], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    count = strtoull(argv[5], NULL, 10);
    if (!(model = load_file(model_path, &size))) return 1;
    cells = size / SECTOR / CELL;
    if (count > cells) count = cells;
    if (!(nbd = connect_to(uri))) return 1;
    for (i = 0; i < count; i++) {
        /* cells i*stride apart, so the writes are spread over the disk */
        uint64_t cell = i * (cells / count);
        uint64_t sectors = below(&rng, 64) + 1;
        uint64_t lba = cell * CELL + below(&rng, CELL - sectors + 1);
        for (j = 0; j < sectors * SECTOR; j++) buf[j] = (unsigned char)(i * 3 + j / SECTOR + 1);
        if (nbd_pwrite(nbd, buf, sectors * SECTOR, lba * SECTOR, 0) == -1)
            FAIL("write: %s", nbd_get_error());
        else
            memcpy(model + lba * SECTOR, buf, sectors * SECTOR);
    }
    /* No flush; shut the connection down without one either. */
    if (save_file(model_path, model, size) != 0) failures++;
    nbd_close(nbd);
    free(model);
    printf("nbd_client scatter: %" PRIu64 " writes, %d failure(s)\n", count, failures);
    return failures ? 1 : 0;
}

struct worker {
    const char *uri;
    unsigned char *model;
    uint64_t lo, hi, seed, ops;
    int failed;
};

/* Writes a few bytes into the sector this worker shares with its left
 * (edge 0) or right (edge 1) neighbour, which writes the other bytes of the
 * same sector at the same time. */
static void edge_write(struct nbd_handle *nbd, struct worker *w, uint64_t *rng)
{
    unsigned char buf[SECTOR];
    uint64_t from, to, i;
    if (below(rng, 2) == 0) {
        from = w->lo;
        to = (w->lo / SECTOR + 1) * SECTOR;
    } else {
        from = w->hi / SECTOR * SECTOR;
        to = w->hi;
    }
    if (from < w->lo) from = w->lo;
    if (to > w->hi) to = w->hi;
    if (from >= to || (from % SECTOR == 0 && to % SECTOR == 0)) return;
    for (i = 0; i < to - from; i++) buf[i] = (unsigned char)next_random(rng);
    if (nbd_pwrite(nbd, buf, to - from, from, 0) == -1)
        FAIL("edge write %" PRIu64 "+%" PRIu64 ": %s", from, to - from, nbd_get_error());
    else
        memcpy(w->model + from, buf, to - from);
}

static void *work(void *arg)
{
    struct worker *w = arg;
    struct nbd_handle *nbd = connect_to(w->uri);
    unsigned char *buf = malloc(256 * SECTOR + 8192);
    uint64_t rng = w->seed, i;
    int before = failure_count();
    if (!nbd || !buf) {
        w->failed = 1;
        free(buf);
        return NULL;
    }
    for (i = 0; i < w->ops; i++) {
        random_op(nbd, w->model, w->lo, w->hi, &rng, buf, 256 * SECTOR);
        edge_write(nbd, w, &rng);
    }
    /* Then only the shared sectors, each write checked by a read. */
    for (i = 0; i < 10 * w->ops; i++) {
        edge_write(nbd, w, &rng);
        if (i % 4 == 3) {
            uint64_t edges[2] = {w->lo / SECTOR * SECTOR, w->hi / SECTOR * SECTOR};
            int e;
            for (e = 0; e < 2; e++) {
                uint64_t from = edges[e] < w->lo ? w->lo : edges[e];
                uint64_t to = edges[e] + SECTOR < w->hi ? edges[e] + SECTOR : w->hi;
                if (from >= to) continue;
                if (nbd_pread(nbd, buf, to - from, from, 0) == -1)
                    FAIL("edge read: %s", nbd_get_error());
                else if (memcmp(buf, w->model + from, to - from) != 0)
                    FAIL("edge %" PRIu64 "+%" PRIu64 " lost a write", from, to - from);
            }
        }
    }
    if (nbd_flush(nbd, 0) == -1) w->failed = 1;
    nbd_close(nbd);
    free(buf);
    if (failure_count() != before) w->failed = 1;
    return NULL;
}

static int run_concurrent(int argc, char **argv)
{
    enum { MAX_THREADS = 16 };
    struct worker workers[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    const char *uri, *model_path;
    uint64_t size, seed, ops;
    unsigned char *model;
    unsigned n, t;
    struct nbd_handle *nbd;
    if (argc < 7) return 2;
    uri = argv[2];
    model_path = argv[3];
    seed = strtoull(argv[4], NULL, 10);
    n = (unsigned)strtoul(argv[5], NULL, 10);
    ops = strtoull(argv[6], NULL, 10);
    if (n < 1 || n > MAX_THREADS) return 2;
    if (!(model = load_file(model_path, &size))) return 1;
    for (t = 0; t < n; t++) {
        /* Boundaries 100 + 37*t bytes past a sector start: neighbours share
         * a sector, so their sub-sector writes race in the plugin. */
        uint64_t lo = t == 0 ? 0 : (size / n) * t / SECTOR * SECTOR + 100 + 37 * t;
        uint64_t hi = t + 1 == n ? size : (size / n) * (t + 1) / SECTOR * SECTOR + 100 + 37 * (t + 1);
        workers[t].uri = uri;
        workers[t].model = model;
        workers[t].lo = lo;
        workers[t].hi = hi;
        workers[t].seed = (seed + t) * 0x9E3779B97F4A7C15ULL + 1;
        workers[t].ops = ops;
        workers[t].failed = 0;
    }
    for (t = 0; t < n; t++)
        if (pthread_create(&threads[t], NULL, work, &workers[t]) != 0) return 1;
    for (t = 0; t < n; t++) {
        pthread_join(threads[t], NULL);
        if (workers[t].failed) FAIL("connection %u failed", t);
    }
    if (!(nbd = connect_to(uri))) return 1;
    compare_export(nbd, model, size);
    nbd_close(nbd);
    if (save_file(model_path, model, size) != 0) failures++;
    free(model);
    printf("nbd_client concurrent: %u connections x %" PRIu64 " operations, %d failure(s)\n", n,
           ops, failures);
    return failures ? 1 : 0;
}

static int run_check_store(int argc, char **argv)
{
    const char *source, *store;
    unsigned char *model, *after = NULL, sector[SECTOR];
    uint64_t size, after_size = 0, drive = 0, lba, from_after = 0;
    uint32_t flags = 0;
    int i;
    HVDDR src, ov;
    COW_CHECK_REPORT report;
    if (argc < 5) return 2;
    source = argv[2];
    store = argv[3];
    if (!(model = load_file(argv[4], &size))) return 1;
    for (i = 5; i < argc; i++) {
        if (strcmp(argv[i], "--follow-parents") == 0) flags = COW_OPEN_FOLLOW_PARENTS;
        else if (!(after = load_file(argv[i], &after_size))) return 1;
    }
    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    if (COW_CheckOverlayStore(store, &report) != COW_ERR_NONE)
        FAIL("check %s: %s", store, COW_GetErrorString(COW_LAST_ERROR));
    else if (!report.consistent)
        FAIL("%s is not consistent: %s", store, report.problems);
    src = VDDR_OpenEx(source, flags);
    if (!src) {
        FAIL("%s: %s", source, COW_GetErrorString(COW_LAST_ERROR));
        return 1;
    }
    ov = COW_OpenCowOverlay(store, src, COW_OPEN_READ_ONLY);
    if (!ov) {
        FAIL("%s: %s", store, COW_GetErrorString(COW_LAST_ERROR));
        COW_Close(src);
        return 1;
    }
    if (!COW_GetDriveSize(ov, &drive) || drive != size || (after && after_size != size)) {
        FAIL("store drive %" PRIu64 " bytes, model %" PRIu64, drive, size);
    } else {
        for (lba = 0; lba < size / SECTOR; lba++) {
            const unsigned char *want = model + lba * SECTOR;
            if (COW_ReadSectors(ov, sector, lba, 1) == VDDR_RSLT_FAIL) {
                FAIL("read sector %" PRIu64 ": %s", lba, COW_GetErrorString(COW_LAST_ERROR));
                break;
            }
            if (memcmp(sector, want, SECTOR) == 0) continue;
            if (after && memcmp(sector, after + lba * SECTOR, SECTOR) == 0) {
                from_after++;
                continue;
            }
            FAIL("sector %" PRIu64 " of the reopened store differs from the model", lba);
            break;
        }
    }
    COW_Close(ov);
    free(model);
    free(after);
    printf("nbd_client check-store: %" PRIu64 " sectors, %" PRIu64
           " from the unflushed writes, %d failure(s)\n",
           size / SECTOR, from_after, failures);
    return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    int r = 2;
    if (argc >= 2 && strcmp(argv[1], "write") == 0) r = run_write(argc, argv);
    else if (argc >= 2 && strcmp(argv[1], "scatter") == 0) r = run_scatter(argc, argv);
    else if (argc >= 2 && strcmp(argv[1], "concurrent") == 0) r = run_concurrent(argc, argv);
    else if (argc >= 2 && strcmp(argv[1], "check-store") == 0) r = run_check_store(argc, argv);
    if (r == 2)
        fprintf(stderr, "usage: nbd_client write|scatter|concurrent|check-store ... (see the source)\n");
    return r;
}
