/* Persistent overlay stores through the C API: create with a store path,
 * edit, close, reopen over the same source and verify every sector against
 * what the edits imply; reopen over a different source (mismatch code);
 * read-only reopen (edits refused, file untouched); a second writer refused
 * while the first holds the store; the consistency check. */
#include "testutil.h"
#include "cow.h"

#define SECTORS 4096u

static unsigned char image[SECTORS * 512];
static unsigned char other[SECTORS * 512];

/* What the edited drive holds: the source with 100 sectors inserted at
 * 1000 (zeros), then sector 0 and sectors 2000..2009 written with 0xA5. */
static void expected_sector(uint32_t v, unsigned char *out)
{
    if (v == 0 || (v >= 2000 && v < 2010)) { memset(out, 0xA5, 512); return; }
    if (v >= 1000 && v < 1100) { memset(out, 0, 512); return; }
    memcpy(out, image + (size_t)(v < 1000 ? v : v - 100) * 512, 512);
}

static int verify(HVDDR ov)
{
    static unsigned char buf[64 * 512];
    unsigned char want[512];
    long long size = 0;
    uint32_t v, i;
    int bad = 0;
    if (!ov->GetDriveSize(ov, &size) || size != (long long)(SECTORS + 100) * 512) return 0;
    for (v = 0; v < SECTORS + 100; v += 64) {
        uint32_t n = SECTORS + 100 - v < 64 ? SECTORS + 100 - v : 64;
        if (ov->ReadSectors(ov, buf, v, n) == VDDR_RSLT_FAIL) return 0;
        for (i = 0; i < n; i++) {
            expected_sector(v + i, want);
            if (memcmp(buf + (size_t)i * 512, want, 512) != 0) bad++;
        }
    }
    return bad == 0;
}

int main(void)
{
    char src_path[64], other_path[64], store_path[80], bogus_path[96];
    tu_fingerprint src_before;
    COW_OPTIONS opt;
    COW_CHECK_REPORT report;
    HVDDR ov, ov2, disk;
    HCOW cow;
    unsigned char sector[512];
    size_t i;

    for (i = 0; i < sizeof image; i++) image[i] = (unsigned char)(i * 13u + i / 512u);
    memcpy(other, image, sizeof other);
    other[0] ^= 0xFF; /* same size, different data */
    CHECK(tu_write_temp(src_path, image, sizeof image));
    CHECK(tu_write_temp(other_path, other, sizeof other));
    snprintf(store_path, sizeof store_path, "%s.cow", src_path);
    src_before = tu_fingerprint_of(src_path);

    /* Create a persistent overlay and edit it. */
    CHECK_EQ_U64(COW_InitOptions(&opt), COW_ERR_NONE);
    opt.granularity = 64;
    opt.store_path = store_path;
    ov = COW_CreateCowOverlayEx(VDDR_Open(src_path, 0), &opt);
    CHECK(ov != NULL);
    if (!ov) { fprintf(stderr, "%s\n", COW_GetErrorString(COW_LAST_ERROR)); return tu_finish("persistent_store"); }
    cow = (HCOW)ov;
    CHECK_EQ_U64(cow->InsertSectors(cow, 1000, 100), COW_ERR_NONE);
    memset(sector, 0xA5, sizeof sector);
    CHECK_EQ_U64(cow->WriteSectors(cow, sector, 0, 1), VDDR_RSLT_NORMAL);
    for (i = 0; i < 10; i++) CHECK_EQ_U64(cow->WriteSectors(cow, sector, 2000 + i, 1), VDDR_RSLT_NORMAL);
    CHECK_EQ_U64(COW_Flush(cow), COW_ERR_NONE);
    CHECK(verify(ov));

    /* While it is open, a second writer is refused. */
    disk = VDDR_Open(src_path, 0);
    CHECK(COW_OpenCowOverlay(store_path, disk, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_LOCKED);
    /* ...and the caller still owns the source after the failure. */
    CHECK(COW_Close(disk) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);

    /* An overlay given as the source of a new overlay whose store cannot
       be created (the path exists) comes back as an overlay: its edit
       methods still work on the caller's handle. */
    {
        HVDDR inner = COW_CreateCowOverlay(VDDR_Open(src_path, 0));
        HCOW inner_cow = (HCOW)inner;
        COW_OPTIONS clash;
        CHECK(inner != NULL);
        CHECK_EQ_U64(COW_InitOptions(&clash), COW_ERR_NONE);
        clash.store_path = store_path; /* exists: refused */
        CHECK(COW_CreateCowOverlayEx(inner, &clash) == NULL);
        CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);
        CHECK_EQ_U64(inner_cow->InsertSectors(inner_cow, 0, 8), COW_ERR_NONE);
        {
            long long bytes = 0;
            CHECK(inner->GetDriveSize(inner, &bytes));
            CHECK_EQ_U64((unsigned long long)bytes, sizeof image + 8 * 512);
        }
        CHECK(inner->Close(inner) == NULL);
    }

    CHECK(ov->Close(ov) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);

    /* Reopen over the same source: everything is there. */
    ov = COW_OpenCowOverlay(store_path, VDDR_Open(src_path, 0), 0);
    CHECK(ov != NULL);
    if (ov) { CHECK(verify(ov)); ov = ov->Close(ov); }

    /* Over a different disk of the same size: refused, with the reason. */
    disk = VDDR_Open(other_path, 0);
    CHECK(COW_OpenCowOverlay(store_path, disk, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_SOURCE_MISMATCH);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "fingerprint") != NULL);
    disk = COW_Close(disk);

    /* Read-only: reads work, edits are refused, the file is untouched. */
    {
        tu_fingerprint store_before = tu_fingerprint_of(store_path);
        ov = COW_OpenCowOverlay(store_path, VDDR_Open(src_path, 0), COW_OPEN_READ_ONLY);
        CHECK(ov != NULL);
        if (ov) {
            CHECK(verify(ov));
            CHECK_EQ_U64(((HCOW)ov)->WriteSectors((HCOW)ov, sector, 5, 1), VDDR_RSLT_FAIL);
            CHECK_EQ_U64(COW_GetLastError(), COW_ERR_READ_ONLY);
            /* Two readers at once are fine. */
            ov2 = COW_OpenCowOverlay(store_path, VDDR_Open(src_path, 0), COW_OPEN_READ_ONLY);
            CHECK(ov2 != NULL);
            if (ov2) ov2 = ov2->Close(ov2);
            ov = ov->Close(ov);
        }
        CHECK(tu_same_fingerprint(store_before, tu_fingerprint_of(store_path)));
    }

    /* The consistency check. */
    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    CHECK_EQ_U64(COW_CheckOverlayStore(store_path, &report), COW_ERR_NONE);
    CHECK(report.consistent);
    CHECK(report.extents >= 3);
    CHECK_EQ_U64(report.leaked_units, 0);
    CHECK_EQ_U64(report.doubly_used_sectors, 0);
    /* A file that is not a store is reported as such, with a reason. */
    snprintf(bogus_path, sizeof bogus_path, "%s", other_path);
    CHECK_EQ_U64(COW_CheckOverlayStore(bogus_path, &report), COW_ERR_NONE); /* the check ran */
    CHECK(!report.consistent);
    CHECK(strstr(report.problems, "not a cowdisk overlay store") != NULL);
    /* Opening it as a store: a clear error. */
    disk = VDDR_Open(src_path, 0);
    CHECK(COW_OpenCowOverlay(bogus_path, disk, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_CORRUPT);
    disk = COW_Close(disk);

    /* Creating over an existing store is refused; the store survives. */
    disk = VDDR_Open(src_path, 0);
    CHECK(COW_CreateCowOverlayEx(disk, &opt) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);
    disk = COW_Close(disk);

    CHECK(tu_same_fingerprint(src_before, tu_fingerprint_of(src_path)));
    unlink(src_path); unlink(other_path); unlink(store_path);
    return tu_finish("persistent_store");
}
