/* A caller's own format plugged in through COW_BACKEND: a tiny in-memory
 * format ("cmem": a 512-byte header with a presence byte per sector, then
 * the sectors; the backend loads the whole file into memory on open).
 * Registration with bad version markers or missing members fails with
 * clear codes; once registered, VDDR_Open finds the format by probing, the
 * disk reads absent sectors as NOTALLOC, an overlay on it takes edits, and
 * closing calls the backend's pfnClose once. The file is never written. */
#include "testutil.h"
#include "cowdisk.h"

#define SECTORS 64u
static const char MAGIC[8] = {'C', 'M', 'E', 'M', 'D', 'S', 'K', '1'};

typedef struct {
    uint64_t sectors;
    unsigned char present[SECTORS];
    unsigned char *data;
} CMem;

static int close_calls = 0;

static int cm_probe(const char *filename)
{
    char head[8];
    FILE *f = fopen(filename, "rb");
    int ok;
    if (!f) return (int)COW_ERR_OPEN;
    ok = fread(head, 1, 8, f) == 8 && memcmp(head, MAGIC, 8) == 0;
    fclose(f);
    return ok ? (int)COW_ERR_NONE : (int)COW_ERR_UNSUPPORTED;
}

static int cm_open(const char *filename, uint32_t flags, void **out)
{
    unsigned char head[512];
    CMem *m;
    FILE *f;
    if (flags & COW_OPEN_READ_WRITE) return (int)COW_ERR_READ_ONLY;
    f = fopen(filename, "rb");
    if (!f) return (int)COW_ERR_OPEN;
    if (fread(head, 1, 512, f) != 512 || memcmp(head, MAGIC, 8) != 0) {
        fclose(f);
        return (int)COW_ERR_CORRUPT;
    }
    m = calloc(1, sizeof *m);
    m->sectors = SECTORS;
    memcpy(m->present, head + 16, SECTORS);
    m->data = malloc(SECTORS * 512);
    if (fread(m->data, 1, SECTORS * 512, f) != SECTORS * 512) {
        fclose(f);
        free(m->data);
        free(m);
        return (int)COW_ERR_CORRUPT;
    }
    fclose(f);
    *out = m;
    return (int)COW_ERR_NONE;
}

static int cm_close(void *p, int del)
{
    CMem *m = p;
    (void)del;
    close_calls++;
    free(m->data);
    free(m);
    return (int)COW_ERR_NONE;
}

/* Serves the run of sectors that are all present or all absent. */
static int cm_read(void *p, uint64_t off, size_t cb, void *buf, size_t *done)
{
    CMem *m = p;
    uint64_t s = off / 512, n = cb / 512, run = 1;
    if (off % 512 || cb % 512 || cb == 0 || s + n > m->sectors) return (int)COW_ERR_INVBLOCK;
    while (run < n && m->present[s + run] == m->present[s]) run++;
    *done = (size_t)run * 512;
    if (!m->present[s]) return (int)COW_ERR_BLOCK_FREE;
    memcpy(buf, m->data + s * 512, (size_t)run * 512);
    return (int)COW_ERR_NONE;
}

static uint64_t cm_size(void *p) { return ((CMem *)p)->sectors * 512; }
static unsigned cm_flags(void *p) { (void)p; return 0; }

static unsigned char file_bytes[512 + SECTORS * 512];
static unsigned char expect[SECTORS * 512];

static int present(uint32_t s) { return s % 5 != 3; }

int main(void)
{
    COW_BACKEND t;
    char path[64];
    uint32_t s, i, count_before;
    HVDDR d, ov;
    HCOW cow;
    unsigned char buf[SECTORS * 512], patch[2 * 512];
    tu_fingerprint before;
    uint64_t size = 0;

    memcpy(file_bytes, MAGIC, 8);
    for (s = 0; s < SECTORS; s++) {
        file_bytes[16 + s] = (unsigned char)present(s);
        for (i = 0; i < 512; i++) {
            unsigned char v = (unsigned char)(s * 7u + i * 13u + 1u);
            file_bytes[512 + s * 512 + i] = v;
            expect[s * 512 + i] = present(s) ? v : 0;
        }
    }
    CHECK(tu_write_temp(path, file_bytes, sizeof file_bytes));
    before = tu_fingerprint_of(path);

    /* Before registration, VDDR_Open takes it for a raw image. */
    d = VDDR_Open(path, 0);
    CHECK(d != NULL);
    if (d) {
        CHECK_EQ_U64(COW_GetDriveType(d), VDD_TYPE_RAW);
        COW_Close(d);
    }

    CHECK_EQ_U64(COW_InitBackend(&t), COW_ERR_NONE);
    CHECK_EQ_U64(t.u32Version, COW_BACKEND_VERSION);
    CHECK_EQ_U64(t.u32VersionEnd, COW_BACKEND_VERSION);
    CHECK(t.pfnRead == NULL);
    t.pszBackendName = "cmem";
    t.uBackendCaps = COW_CAP_FILE;
    t.pfnProbe = cm_probe;
    t.pfnOpen = cm_open;
    t.pfnClose = cm_close;
    t.pfnRead = cm_read;
    t.pfnGetSize = cm_size;
    t.pfnGetImageFlags = cm_flags;

    /* Bad version markers: COW_ERR_UNSUPPORTED. */
    t.u32Version = 0x12345678u;
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_UNSUPPORTED);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_UNSUPPORTED);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "u32Version") != NULL);
    t.u32Version = COW_BACKEND_VERSION;
    t.u32VersionEnd = 0;
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_UNSUPPORTED);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_UNSUPPORTED);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "u32VersionEnd") != NULL);
    t.u32VersionEnd = COW_BACKEND_VERSION;

    /* Missing required members: COW_ERR_INVALID_ARG naming them. */
    t.pfnRead = NULL;
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "pfnRead") != NULL);
    t.pfnRead = cm_read;
    t.uBackendCaps = COW_CAP_FILE | COW_CAP_CREATE_DYNAMIC;
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "pfnCreate") != NULL);
    t.uBackendCaps = COW_CAP_FILE | COW_CAP_WRITE;
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    t.uBackendCaps = COW_CAP_FILE;
    t.pszBackendName = "raw"; /* a built-in's name */
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    t.pszBackendName = "cmem";
    CHECK_EQ_U64(COW_RegisterBackend(NULL), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);

    count_before = COW_GetBackendCount();
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_NONE);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    CHECK_EQ_U64(COW_RegisterBackend(&t), COW_ERR_INVALID_ARG); /* twice */
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetBackendCount(), count_before + 1);
    CHECK(COW_FindBackend("cmem") == &t);
    CHECK(COW_GetBackend(0) == &t); /* registered backends are probed first */

    /* VDDR_Open probes the registered backend. */
    d = VDDR_Open(path, 0);
    CHECK(d != NULL);
    if (!d) return tu_finish("backend_custom");
    CHECK_EQ_U64(COW_GetDriveType(d), VDD_TYPE_CUSTOM);
    CHECK(COW_GetDriveSize(d, &size));
    CHECK_EQ_U64(size, SECTORS * 512);
    CHECK_EQ_U64(d->ReadSectors(d, buf, 0, SECTORS), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, expect, sizeof buf) == 0);
    CHECK_EQ_U64(d->ReadSectors(d, buf, 3, 1), VDDR_RSLT_NOTALLOC); /* block free */
    CHECK_EQ_U64(COW_BlockStatus(d, 8, 8), VDDR_RSLT_NOTALLOC);
    CHECK_EQ_U64(COW_BlockStatus(d, 8, 9), VDDR_RSLT_NORMAL);

    /* An overlay on it, with edits. */
    ov = COW_CreateCowOverlay(d);
    CHECK(ov != NULL);
    if (!ov) return tu_finish("backend_custom");
    cow = (HCOW)ov;
    memset(patch, 0xEE, sizeof patch);
    CHECK_EQ_U64(cow->WriteSectors(cow, patch, 3, 2), VDDR_RSLT_NORMAL); /* over a free and a present sector */
    memcpy(expect + 3 * 512, patch, sizeof patch);
    CHECK_EQ_U64(cow->InsertSectors(cow, 0, 2), COW_ERR_NONE); /* two unallocated sectors in front */
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 0, 2), VDDR_RSLT_NOTALLOC);
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 2, SECTORS), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, expect, SECTORS * 512) == 0);
    CHECK_EQ_U64(cow->MoveSectors(cow, 2, SECTORS + 2, 4), COW_ERR_NONE); /* first 4 source sectors to the end */
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, SECTORS - 2, 4), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, expect, 4 * 512) == 0);
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 2, 4), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, expect + 4 * 512, 4 * 512) == 0);
    CHECK_EQ_U64(close_calls, 0);
    CHECK(ov->Close(ov) == NULL);
    CHECK_EQ_U64(close_calls, 1); /* closing the overlay closed the backend's image */

    /* Opened explicitly with the table. */
    d = VDDR_OpenWithBackend(&t, path, 0);
    CHECK(d != NULL);
    if (d) COW_Close(d);
    CHECK_EQ_U64(close_calls, 2);
    CHECK(VDDR_OpenWithBackend(&t, path, COW_OPEN_READ_WRITE) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);

    CHECK_EQ_U64(COW_UnregisterBackend(&t), COW_ERR_NONE);
    CHECK_EQ_U64(COW_UnregisterBackend(&t), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK(COW_FindBackend("cmem") == NULL);
    CHECK_EQ_U64(COW_GetBackendCount(), count_before);

    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(path)));
    unlink(path);
    return tu_finish("backend_custom");
}
