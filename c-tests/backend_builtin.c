/* The built-in formats driven through their COW_BACKEND tables: every
 * built-in is enumerable and found by name; raw is read through the table;
 * a UML COW file is created, written through the "cow" table (unwritten
 * ranges answer COW_ERR_BLOCK_FREE with their length), and read back with
 * its backing file; a VCI image is created, written, discarded and read
 * through the "vci" table, then opened as a disk by VDDR_Open. */
#include "testutil.h"
#include "cowdisk.h"

#define N 64u

static unsigned char base[N * 512];

static int has_backend(const char *name)
{
    uint32_t i, n = COW_GetBackendCount();
    for (i = 0; i < n; i++) {
        const COW_BACKEND *b = COW_GetBackend(i);
        if (b && strcmp(b->pszBackendName, name) == 0) return 1;
    }
    return 0;
}

static int progress_calls = 0;
static int progress(void *user, unsigned percent)
{
    (void)user;
    (void)percent;
    progress_calls++;
    return 0;
}

int main(void)
{
    const COW_BACKEND *raw, *cow, *vci;
    char rawpath[64], cowpath[80], vcipath[80];
    void *data = NULL;
    unsigned char buf[N * 512], expect[N * 512], patch[4 * 512];
    size_t done = 0;
    uint32_t i;
    tu_fingerprint before;
    HVDDR d;
    S_UUID u, u2;

    for (i = 0; i < sizeof base; i++) base[i] = (unsigned char)(i * 31u + (i >> 9));
    CHECK(tu_write_temp(rawpath, base, sizeof base));
    before = tu_fingerprint_of(rawpath);

    CHECK(has_backend("raw") && has_backend("vdi") && has_backend("parallels"));
    CHECK(has_backend("cow") && has_backend("vci"));
    CHECK(COW_GetBackend(COW_GetBackendCount()) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);

    /* raw through the table. */
    raw = COW_FindBackend("raw");
    CHECK(raw != NULL);
    if (!raw) return tu_finish("backend_builtin");
    CHECK_EQ_U64(raw->u32Version, COW_BACKEND_VERSION);
    CHECK_EQ_U64(raw->u32VersionEnd, COW_BACKEND_VERSION);
    CHECK(raw->pfnWrite == NULL); /* sources are read-only */
    CHECK_EQ_U64(raw->pfnProbe(rawpath), COW_ERR_NONE);
    CHECK_EQ_U64(raw->pfnOpen(rawpath, COW_OPEN_READ_WRITE, &data), COW_ERR_READ_ONLY);
    CHECK_EQ_U64(raw->pfnOpen(rawpath, 0, &data), COW_ERR_NONE);
    CHECK_EQ_U64(raw->pfnGetSize(data), sizeof base);
    CHECK_EQ_U64(raw->pfnRead(data, 512, 8 * 512, buf, &done), COW_ERR_NONE);
    CHECK_EQ_U64(done, 8 * 512);
    CHECK(memcmp(buf, base + 512, 8 * 512) == 0);
    CHECK_EQ_U64(raw->pfnRead(data, 100, 512, buf, &done), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(raw->pfnGetUuid(data, &u), COW_ERR_UNSUPPORTED);
    CHECK_EQ_U64(raw->pfnClose(data, 0), COW_ERR_NONE);
    CHECK_EQ_U64(raw->pfnRead(data, 0, 512, buf, &done), COW_ERR_INVHANDLE); /* stale */
    CHECK_EQ_U64(raw->pfnGetSize(NULL), 0);

    /* UML COW: create over the raw file, write through the table. */
    snprintf(cowpath, sizeof cowpath, "%s.cow", rawpath);
    CHECK_EQ_U64(COW_UmlCowCreate(cowpath, rawpath, 3), COW_ERR_NONE);
    cow = COW_FindBackend("cow");
    CHECK(cow != NULL);
    if (!cow) return tu_finish("backend_builtin");
    CHECK(cow->uBackendCaps & COW_CAP_DIFF);
    CHECK_EQ_U64(cow->pfnProbe(cowpath), COW_ERR_NONE);
    CHECK(cow->pfnProbe(rawpath) != COW_ERR_NONE);
    CHECK_EQ_U64(cow->pfnOpen(cowpath, COW_OPEN_READ_WRITE, &data), COW_ERR_NONE);
    CHECK_EQ_U64(cow->pfnGetVersion(data), 3);
    CHECK_EQ_U64(cow->pfnGetImageFlags(data) & COW_IMAGE_DIFF, COW_IMAGE_DIFF);
    memset(patch, 0x77, sizeof patch);
    CHECK_EQ_U64(cow->pfnWrite(data, 10 * 512, sizeof patch, patch, &done), COW_ERR_NONE);
    CHECK_EQ_U64(done, sizeof patch);
    /* Sectors 0..9 are not in the COW file: block free, run of 10. */
    CHECK_EQ_U64(cow->pfnRead(data, 0, N * 512, buf, &done), COW_ERR_BLOCK_FREE);
    CHECK_EQ_U64(done, 10 * 512);
    CHECK_EQ_U64(cow->pfnRead(data, 10 * 512, N * 512 - 10 * 512, buf, &done), COW_ERR_NONE);
    CHECK_EQ_U64(done, sizeof patch);
    CHECK(memcmp(buf, patch, sizeof patch) == 0);
    CHECK_EQ_U64(cow->pfnFlush(data), COW_ERR_NONE);
    CHECK_EQ_U64(cow->pfnClose(data, 0), COW_ERR_NONE);
    /* Read back as a disk over its backing file. */
    memcpy(expect, base, sizeof base);
    memcpy(expect + 10 * 512, patch, sizeof patch);
    d = VDDR_OpenUmlCow(cowpath, rawpath, 0);
    CHECK(d != NULL);
    if (d) {
        CHECK_EQ_U64(COW_GetDriveType(d), VDD_TYPE_UMLCOW);
        CHECK_EQ_U64(d->ReadSectors(d, buf, 0, N), VDDR_RSLT_NORMAL);
        CHECK(memcmp(buf, expect, sizeof buf) == 0);
        COW_Close(d);
    }
    /* Without the backing file and without permission to follow: refused. */
    CHECK(VDDR_Open(cowpath, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);
    d = VDDR_OpenEx(cowpath, COW_OPEN_FOLLOW_PARENTS);
    CHECK(d != NULL);
    if (d) {
        CHECK_EQ_U64(d->ReadSectors(d, buf, 0, N), VDDR_RSLT_NORMAL);
        CHECK(memcmp(buf, expect, sizeof buf) == 0);
        COW_Close(d);
    }
    unlink(cowpath);

    /* VCI: create, write, discard, read through the table. */
    snprintf(vcipath, sizeof vcipath, "%s.vci", rawpath);
    vci = COW_FindBackend("vci");
    CHECK(vci != NULL);
    if (!vci) return tu_finish("backend_builtin");
    CHECK(vci->pfnCreate != NULL && vci->pfnDiscard != NULL);
    memset(&u, 0xAB, sizeof u);
    CHECK_EQ_U64(vci->pfnCreate(vcipath, N * 512, 0, NULL, &u, COW_OPEN_READ_WRITE,
                                progress, NULL, &data),
                 COW_ERR_NONE);
    CHECK(progress_calls >= 1);
    CHECK_EQ_U64(vci->pfnGetSize(data), N * 512);
    CHECK_EQ_U64(vci->pfnGetUuid(data, &u2), COW_ERR_NONE);
    CHECK(memcmp(&u, &u2, sizeof u) == 0);
    CHECK_EQ_U64(vci->pfnRead(data, 0, 512, buf, &done), COW_ERR_BLOCK_FREE);
    CHECK_EQ_U64(vci->pfnWrite(data, 0, N * 512, base, &done), COW_ERR_NONE);
    CHECK_EQ_U64(vci->pfnDiscard(data, 8 * 512, 8 * 512), COW_ERR_NONE);
    CHECK_EQ_U64(vci->pfnRead(data, 0, N * 512, buf, &done), COW_ERR_NONE);
    CHECK_EQ_U64(done, 8 * 512);
    CHECK_EQ_U64(vci->pfnRead(data, 8 * 512, N * 512 - 8 * 512, buf, &done), COW_ERR_BLOCK_FREE);
    CHECK_EQ_U64(done, 8 * 512);
    CHECK_EQ_U64(vci->pfnFlush(data), COW_ERR_NONE);
    CHECK_EQ_U64(vci->pfnClose(data, 0), COW_ERR_NONE);
    memcpy(expect, base, sizeof base);
    memset(expect + 8 * 512, 0, 8 * 512);
    d = VDDR_Open(vcipath, 0);
    CHECK(d != NULL);
    if (d) {
        CHECK_EQ_U64(COW_GetDriveType(d), VDD_TYPE_VCI);
        CHECK_EQ_U64(d->ReadSectors(d, buf, 0, N), VDDR_RSLT_NORMAL);
        CHECK(memcmp(buf, expect, sizeof buf) == 0);
        CHECK_EQ_U64(COW_BlockStatus(d, 8, 15), VDDR_RSLT_NOTALLOC);
        COW_Close(d);
    }
    /* Close with delete removes the file. */
    CHECK_EQ_U64(vci->pfnOpen(vcipath, 0, &data), COW_ERR_NONE);
    CHECK_EQ_U64(vci->pfnClose(data, 1), COW_ERR_NONE);
    CHECK(access(vcipath, F_OK) != 0);

    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(rawpath)));
    unlink(rawpath);
    return tu_finish("backend_builtin");
}
