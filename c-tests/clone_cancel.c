/* COW_CloneToFile from C: a progress callback that cancels half-way leaves
 * no file (not even a temporary one) and the error says cancelled; a clone
 * that runs to the end writes the overlay's bytes; bad arguments fail with
 * clear codes; the source file is never written. */
#include "testutil.h"

#include <dirent.h>

#include "cowdisk.h"

#define SECTORS (8u * 2048u) /* 8 MiB */

typedef struct {
    unsigned calls;
    unsigned last;
    int cancel_at; /* cancel when percent reaches this; <0: never */
    int monotonic;
} progress_state;

static int on_progress(void *user, uint32_t percent)
{
    progress_state *s = (progress_state *)user;
    if (s->calls > 0 && percent <= s->last) s->monotonic = 0;
    s->calls++;
    s->last = percent;
    return (s->cancel_at >= 0 && (int)percent >= s->cancel_at) ? 1 : 0;
}

static unsigned entries_in(const char *dir)
{
    unsigned n = 0;
    struct dirent *e;
    DIR *d = opendir(dir);
    if (!d) return 9999;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    }
    closedir(d);
    return n;
}

static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long len;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (unsigned char *)malloc((size_t)len + 1);
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)len;
    return buf;
}

int main(void)
{
    char src[64], dir[64], out[128];
    const char *tmp = getenv("TMPDIR");
    unsigned char *data = (unsigned char *)malloc((size_t)SECTORS * 512);
    unsigned char sector[512];
    tu_fingerprint before;
    progress_state ps;
    HVDDR disk, ov;
    size_t i, size = 0;
    unsigned char *cloned;

    for (i = 0; i < (size_t)SECTORS * 512; i++) data[i] = (unsigned char)(i * 7 + i / 512) | 1;
    CHECK(tu_write_temp(src, data, (size_t)SECTORS * 512));
    before = tu_fingerprint_of(src);
    snprintf(dir, sizeof dir, "%s/cowdisk-clone-XXXXXX", tmp ? tmp : "/tmp");
    CHECK(mkdtemp(dir) != NULL);
    snprintf(out, sizeof out, "%s/clone.raw", dir);

    disk = VDDR_Open(src, 0);
    CHECK(disk != NULL);
    ov = COW_CreateCowOverlay(disk);
    CHECK(ov != NULL);
    memset(sector, 0xEE, sizeof sector);
    CHECK_EQ_U64(COW_WriteSectors((HCOW)ov, sector, 100, 1), VDDR_RSLT_NORMAL);

    /* Cancelled half-way: COW_ERR_CANCELLED returned, nothing left. */
    memset(&ps, 0, sizeof ps);
    ps.cancel_at = 50;
    ps.monotonic = 1;
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_RAW, 0, on_progress, &ps), COW_ERR_CANCELLED);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_CANCELLED);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "cancel") != NULL);
    CHECK(ps.last >= 50 && ps.last < 100);
    CHECK(ps.monotonic);
    CHECK(access(out, F_OK) != 0);
    CHECK_EQ_U64(entries_in(dir), 0);

    /* The same for VDI. */
    memset(&ps, 0, sizeof ps);
    ps.cancel_at = 50;
    ps.monotonic = 1;
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_VDI, 0, on_progress, &ps), COW_ERR_CANCELLED);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_CANCELLED);
    CHECK_EQ_U64(entries_in(dir), 0);

    /* Run to the end: 0 first, 100 last, the overlay's bytes. */
    memset(&ps, 0, sizeof ps);
    ps.cancel_at = -1;
    ps.monotonic = 1;
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_RAW, 0, on_progress, &ps), COW_ERR_NONE);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    CHECK(ps.monotonic);
    CHECK_EQ_U64(ps.last, 100);
    CHECK(ps.calls >= 2);
    cloned = read_file(out, &size);
    CHECK(cloned != NULL);
    CHECK_EQ_U64(size, (uint64_t)SECTORS * 512);
    if (cloned && size == (size_t)SECTORS * 512) {
        memcpy(data + 100 * 512, sector, 512);
        CHECK(memcmp(cloned, data, size) == 0);
    }
    free(cloned);

    /* An existing file is refused and kept; REPLACE replaces it. */
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_RAW, 0, NULL, NULL), COW_ERR_OPEN);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_RAW, COW_CLONE_REPLACE, NULL, NULL), COW_ERR_NONE);
    CHECK_EQ_U64(entries_in(dir), 1);

    /* Bad arguments. */
    CHECK_EQ_U64(COW_CloneToFile(NULL, out, VDD_TYPE_RAW, 0, NULL, NULL), COW_ERR_INVHANDLE);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK_EQ_U64(COW_CloneToFile(ov, NULL, VDD_TYPE_RAW, 0, NULL, NULL), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_RAW, 0x80, NULL, NULL), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_PARALLELS, COW_CLONE_REPLACE, NULL, NULL), COW_ERR_UNSUPPORTED);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_UNSUPPORTED);

    ov = COW_Close(ov);
    CHECK(ov == NULL);
    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(src)));
    unlink(out);
    rmdir(dir);
    unlink(src);
    free(data);
    return tu_finish("clone_cancel");
}
