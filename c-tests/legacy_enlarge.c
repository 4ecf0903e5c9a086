/* A legacy-style client, written the way the legacy cloning tool enlarges a
 * drive: open a raw disk holding an MBR and two partitions, wrap it in an
 * overlay, insert space after the first partition, grow the first partition
 * into half of it, slide the second partition down with MoveSectors, patch
 * the MBR with WriteSectors, then read every page with ReadPage and check
 * every byte against what the edits imply (worked out here, independently
 * of the library, from the layout arithmetic). Uses only the legacy method
 * call syntax. */
#include "testutil.h"
#include "vddr.h"
#include "cow.h"

#define SECTORS      8192u   /* 4 MiB source */
#define P1_START     2048u
#define P1_SIZE      2048u
#define P2_START     4096u
#define P2_SIZE      3072u
#define INSERTED     4096u   /* space inserted after partition 1 */
#define P1_GROWTH    2048u   /* partition 1 grows by this much */
#define NEW_P2_START (P1_START + P1_SIZE + P1_GROWTH)
#define NEW_SECTORS  (SECTORS + INSERTED)
#define SPB_SHIFT    11u     /* 1 MiB pages, as the legacy tool uses */

static unsigned char source[SECTORS * 512];

static void put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

static void set_partition(unsigned char *mbr, int index, uint32_t start, uint32_t size)
{
    unsigned char *e = mbr + 446 + 16 * index;
    memset(e, 0, 16);
    e[4] = 0x83; /* Linux */
    put_le32(e + 8, start);
    put_le32(e + 12, size);
}

/* Recognisable data in every sector of the source: sector number and a
 * running pattern; the MBR gets a boot signature and two partitions. */
static void build_source(void)
{
    uint32_t s;
    size_t i;
    for (s = 0; s < SECTORS; s++) {
        unsigned char *p = source + (size_t)s * 512;
        for (i = 0; i < 512; i++) p[i] = (unsigned char)((s * 7u + i * 13u) | 1u);
        put_le32(p, s);
    }
    memset(source, 0, 512);
    set_partition(source, 0, P1_START, P1_SIZE);
    set_partition(source, 1, P2_START, P2_SIZE);
    source[510] = 0x55; source[511] = 0xAA;
}

/* Where virtual sector `v` of the edited drive comes from: a source sector,
 * or -1 for inserted space (zeros, NOTALLOC). Sector 0 is the new MBR. */
static long origin_of(uint32_t v)
{
    /* After the insert at P2_START: [0, P2_START) source, then INSERTED
     * zeros, then source P2_START.. . Moving the INSERTED+... as computed:
     * the second partition now starts at NEW_P2_START; the inserted space
     * not given to partition 1 follows it; then the source's tail. */
    if (v < P2_START) return (long)v;
    if (v < NEW_P2_START) return -1;                         /* p1 growth */
    if (v < NEW_P2_START + P2_SIZE) return (long)(P2_START + (v - NEW_P2_START));
    if (v < NEW_P2_START + P2_SIZE + (INSERTED - P1_GROWTH)) return -1;
    return (long)(P2_START + P2_SIZE + (v - (NEW_P2_START + P2_SIZE + (INSERTED - P1_GROWTH))));
}

int main(void)
{
    char path[64];
    tu_fingerprint before;
    HVDDR hdisk, hcow;
    HCOW cow;
    long long bytes = 0;
    uint32_t pages, page;
    unsigned char mbr[512];
    static unsigned char page_buf[(1u << SPB_SHIFT) * 512];

    build_source();
    CHECK(tu_write_temp(path, source, sizeof source));
    before = tu_fingerprint_of(path);

    hdisk = VDDR_Open(path, 0);
    CHECK(hdisk != NULL);
    if (!hdisk) return tu_finish("legacy_enlarge");
    CHECK(hdisk->GetDriveType(hdisk) == VDD_TYPE_RAW);

    hcow = COW_CreateCowOverlay(hdisk);
    CHECK(hcow != NULL);
    if (!hcow) return tu_finish("legacy_enlarge");
    cow = (HCOW)hcow;
    CHECK(hcow->GetDriveType(hcow) == VDD_TYPE_COW);

    /* Enlarge: space after partition 1, slide partition 2 down so that
     * partition 1 can grow by P1_GROWTH, then patch the MBR. */
    /* The legacy header: "Returns an error code, 0 = no error." */
    CHECK_EQ_U64(cow->InsertSectors(cow, P1_START + P1_SIZE, INSERTED), COW_ERR_NONE);
    CHECK_EQ_U64(cow->MoveSectors(cow, P2_START + INSERTED, NEW_P2_START, P2_SIZE), COW_ERR_NONE);
    CHECK(((HVDDR)cow)->ReadSectors((HVDDR)cow, mbr, 0, 1) == VDDR_RSLT_NORMAL);
    set_partition(mbr, 0, P1_START, P1_SIZE + P1_GROWTH);
    set_partition(mbr, 1, NEW_P2_START, P2_SIZE);
    CHECK_EQ_U64(cow->WriteSectors(cow, mbr, 0, 1), VDDR_RSLT_NORMAL);

    CHECK(hcow->GetDriveSize(hcow, &bytes));
    CHECK_EQ_U64(bytes, (uint64_t)NEW_SECTORS * 512);
    pages = hcow->GetDriveBlockCount(hcow, SPB_SHIFT);
    CHECK_EQ_U64(pages, NEW_SECTORS >> SPB_SHIFT);

    for (page = 0; page < pages; page++) {
        uint32_t first = page << SPB_SHIFT, s;
        int any_data = 0, rc;
        rc = ((HVDDR)cow)->ReadPage((HVDDR)cow, page_buf, page, SPB_SHIFT);
        for (s = 0; s < (1u << SPB_SHIFT); s++) {
            uint32_t v = first + s;
            long from = origin_of(v);
            const unsigned char *got = page_buf + (size_t)s * 512;
            static const unsigned char zeros[512];
            const unsigned char *want = v == 0 ? mbr
                                      : from < 0 ? zeros
                                      : source + (size_t)from * 512;
            if (memcmp(got, want, 512) != 0) {
                fprintf(stderr, "sector %u differs\n", v);
                tu_failures++;
                break;
            }
            any_data |= from >= 0;
        }
        /* A page made only of inserted space is NOTALLOC; others NORMAL. */
        CHECK_EQ_U64(rc, any_data ? VDDR_RSLT_NORMAL : VDDR_RSLT_NOTALLOC);
        CHECK_EQ_U64(hcow->BlockStatus(hcow, first, first + (1u << SPB_SHIFT) - 1), rc);
    }

    hcow = hcow->Close(hcow);
    CHECK(hcow == NULL);
    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(path)));
    unlink(path);
    return tu_finish("legacy_enlarge");
}
