/* A caller-supplied source object - the caller's own struct with a VDDR
 * table first, as existing tools pass in their own readers - used as an
 * overlay source. Checks reads through the overlay against the object's
 * memory, that the object's BlockStatus flows through, that the overlay
 * calls the object's Close exactly once when it is closed, that a failed
 * creation leaves the object to the caller, and walks the extent map. */
#include "testutil.h"
#include "cowdisk.h"

#define SECTORS 256u

typedef struct {
    VDDR vddr;                 /* must be first */
    unsigned char data[SECTORS * 512];
    int close_calls;
} MemSource;

/* The table's member types are the legacy ones: BOOL and UINT are
 * unsigned int, HUGE is long long. */
static unsigned int ms_type(HVDDR h) { (void)h; return VDD_TYPE_RAW; }
static unsigned int ms_size(HVDDR h, long long *bytes) { (void)h; *bytes = SECTORS * 512; return 1; }
/* Sectors 128..191 are "never allocated" in this source. */
static int unallocated(long long s) { return s >= 128 && s < 192; }
static unsigned int ms_status(HVDDR h, long long first, long long last)
{
    long long s;
    (void)h;
    for (s = first; s <= last; s++)
        if (!unallocated(s)) return VDDR_RSLT_NORMAL;
    return VDDR_RSLT_NOTALLOC;
}
static int ms_read(HVDDR h, void *buf, long long lba, unsigned int n)
{
    MemSource *m = (MemSource *)h;
    if (lba + n > SECTORS) return VDDR_RSLT_FAIL;
    memcpy(buf, m->data + lba * 512, (size_t)n * 512);
    return (int)ms_status(h, lba, lba + n - 1);
}
static HVDDR ms_close(HVDDR h) { ((MemSource *)h)->close_calls++; return NULL; }

static void init_source(MemSource *m)
{
    uint32_t s, i;
    memset(m, 0, sizeof *m);
    m->vddr.GetDriveType = ms_type;
    m->vddr.GetDriveSize = ms_size;
    m->vddr.BlockStatus = ms_status;
    m->vddr.ReadSectors = ms_read;
    m->vddr.Close = ms_close;
    for (s = 0; s < SECTORS; s++)
        for (i = 0; i < 512; i++)
            m->data[s * 512 + i] = unallocated(s) ? 0 : (unsigned char)(s ^ (i * 3u) ^ 0x80u);
}

static MemSource src;

int main(void)
{
    COW_OPTIONS opt;
    HVDDR ov;
    HCOW cow;
    unsigned char buf[16 * 512], patch[512];
    COW_EXTENT e;
    uint64_t count = 0, lba, seen;

    init_source(&src);

    /* A failed creation (bad granularity) leaves the object to us. */
    CHECK_EQ_U64(COW_InitOptions(&opt), COW_ERR_NONE);
    opt.granularity = 100; /* not a power of two */
    CHECK(COW_CreateCowOverlayEx((HVDDR)&src, &opt) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(src.close_calls, 0);

    opt.granularity = 8;
    ov = COW_CreateCowOverlayEx((HVDDR)&src, &opt);
    CHECK(ov != NULL);
    if (!ov) return tu_finish("caller_source");
    cow = (HCOW)ov;

    /* Plain reads pass the caller's data and statuses through. */
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 10, 16), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, src.data + 10 * 512, sizeof buf) == 0);
    CHECK_EQ_U64(ov->BlockStatus(ov, 130, 150), VDDR_RSLT_NOTALLOC);
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 140, 16), VDDR_RSLT_NOTALLOC);

    /* Edits: move the first 8 sectors to the end, write one sector. */
    CHECK_EQ_U64(cow->MoveSectors(cow, 0, SECTORS, 8), COW_ERR_NONE);
    memset(patch, 0xC3, sizeof patch);
    CHECK_EQ_U64(cow->WriteSectors(cow, patch, 100, 1), VDDR_RSLT_NORMAL);
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, SECTORS - 8, 8), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, src.data, 8 * 512) == 0);
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 92, 16), VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, src.data + 100 * 512, 8 * 512) == 0);     /* 92..99 = src 100..107 */
    CHECK(memcmp(buf + 8 * 512, patch, 512) == 0);               /* 100 = the patch */
    CHECK(memcmp(buf + 9 * 512, src.data + 109 * 512, 7 * 512) == 0);
    CHECK(src.data[0] != 0xC3); /* the source object's memory is untouched */

    /* The extent map, walked both ways: by index and by LBA. Expected:
     * src 8..107 (with 100..107 copied to the store: one COW unit of 8
     * sectors aligned at virtual 96), store, src 112..255, src 0..7. */
    CHECK_EQ_U64(COW_GetExtentCount(cow, &count), COW_ERR_NONE);
    CHECK_EQ_U64(count, 4);
    CHECK_EQ_U64(COW_GetExtent(cow, 0, &e), COW_ERR_NONE);
    CHECK_EQ_U64(e.start, 0); CHECK_EQ_U64(e.length, 96);
    CHECK_EQ_U64(e.kind, COW_EXTENT_SOURCE); CHECK_EQ_U64(e.position, 8);
    CHECK_EQ_U64(COW_GetExtent(cow, 1, &e), COW_ERR_NONE);
    CHECK_EQ_U64(e.start, 96); CHECK_EQ_U64(e.length, 8); CHECK_EQ_U64(e.kind, COW_EXTENT_STORE);
    CHECK_EQ_U64(COW_GetExtent(cow, 2, &e), COW_ERR_NONE);
    CHECK_EQ_U64(e.position, 112); CHECK_EQ_U64(e.length, SECTORS - 8 - 104);
    CHECK_EQ_U64(COW_GetExtent(cow, 3, &e), COW_ERR_NONE);
    CHECK_EQ_U64(e.start, SECTORS - 8); CHECK_EQ_U64(e.position, 0);
    CHECK_EQ_U64(COW_GetExtent(cow, 4, &e), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    for (lba = 0, seen = 0; lba < SECTORS; lba = e.start + e.length, seen++) {
        COW_EXTENT by_index;
        CHECK_EQ_U64(COW_GetExtentAt(cow, (uint64_t)lba, &e), COW_ERR_NONE);
        CHECK_EQ_U64(COW_GetExtent(cow, seen, &by_index), COW_ERR_NONE);
        CHECK_EQ_U64(e.start, by_index.start);
        CHECK_EQ_U64(e.length, by_index.length);
        if (e.length == 0) break;
    }
    CHECK_EQ_U64(seen, count);

    /* Closing the overlay closes the caller's object, once. */
    CHECK(ov->Close(ov) == NULL);
    CHECK_EQ_U64(src.close_calls, 1);
    return tu_finish("caller_source");
}
