/* Error paths: NULL, foreign and closed handles, out-of-range LBAs, the
 * invalid move, a non-overlay handle given an edit, a missing file - each
 * with its exact code, and the strings: the fixed descriptions, and the
 * detailed text of the thread's last error. */
#include "testutil.h"
#include "cow.h"

static unsigned char image[64 * 512];

int main(void)
{
    char path[64];
    tu_fingerprint before;
    HVDDR disk, ov;
    HCOW cow;
    uint64_t size = 0;
    unsigned char buf[4 * 512];
    struct { VDDR vddr; int junk; } foreign;
    char *s;
    size_t i;

    for (i = 0; i < sizeof image; i++) image[i] = (unsigned char)(i * 31u + 7u);
    CHECK(tu_write_temp(path, image, sizeof image));
    before = tu_fingerprint_of(path);

    /* NULL handles. */
    CHECK(COW_ReadSectors(NULL, buf, 0, 1) == VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK(!COW_GetDriveSize(NULL, &size));
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK_EQ_U64(COW_GetDriveType(NULL), VDD_TYPE_INVALID);
    /* Edits return their COW_ERR_* code (0 = no error), as the legacy
     * header says, and set it as the last error too. */
    CHECK_EQ_U64(COW_InsertSectors(NULL, 0, 1), COW_ERR_INVHANDLE);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK_EQ_U64(COW_DeleteSectors(NULL, 0, 1), COW_ERR_INVHANDLE);
    CHECK_EQ_U64(COW_Flush(NULL), COW_ERR_INVHANDLE);
    CHECK(COW_Close(NULL) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK(COW_CreateCowOverlay(NULL) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    /* A foreign pointer given to a COW_ function is refused, not used. */
    memset(&foreign, 0, sizeof foreign);
    CHECK(COW_ReadPage((HVDDR)&foreign, buf, 0, 0) == VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK(!COW_WriteSectors((HCOW)&foreign, buf, 0, 1));
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    /* A missing file. */
    CHECK(VDDR_Open("/nonexistent/cowdisk/disk.img", 0) == NULL);
    CHECK_EQ_U64(VDDR_GetLastError(), COW_ERR_OPEN);
    CHECK(strstr(VDDR_GetErrorString(0xFFFFFFFFu), "/nonexistent/cowdisk/disk.img") != NULL);

    disk = VDDR_Open(path, 0);
    CHECK(disk != NULL);
    if (!disk) return tu_finish("error_paths");
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);

    /* Edits on a disk that is not an overlay. */
    CHECK_EQ_U64(COW_InsertSectors((HCOW)disk, 0, 1), COW_ERR_NOT_OVERLAY);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NOT_OVERLAY);

    /* A raw image has no UUID. */
    {
        S_UUID u;
        CHECK(!disk->GetDriveUUID(disk, &u));
        CHECK_EQ_U64(COW_GetLastError(), COW_ERR_UNSUPPORTED);
    }

    ov = COW_CreateCowOverlay(disk);
    CHECK(ov != NULL);
    if (!ov) return tu_finish("error_paths");
    cow = (HCOW)ov;
    /* The adopted source handle is no longer valid on its own. */
    CHECK(COW_GetDriveSize(disk, &size) == 0);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    /* Out-of-range reads and writes fail whole and touch nothing. */
    memset(buf, 0xEE, sizeof buf);
    CHECK(ov->ReadSectors(ov, buf, 62, 4) == VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
    for (i = 0; i < sizeof buf; i++) if (buf[i] != 0xEE) { CHECK(buf[i] == 0xEE); break; }
    CHECK(!cow->WriteSectors(cow, buf, 63, 2));
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
    CHECK(ov->ReadSectors(ov, buf, 63, 1) == VDDR_RSLT_NORMAL);
    CHECK(memcmp(buf, image + 63 * 512, 512) == 0);
    CHECK(ov->ReadSectors(ov, buf, -1, 2) == VDDR_RSLT_FAIL); /* a negative HUGE */
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
    CHECK(COW_ReadSectors(ov, buf, 0xFFFFFFFFFFFFFFFFULL, 2) == VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
    /* Reading zero sectors is NORMAL, wherever it points (legacy). */
    CHECK_EQ_U64(ov->ReadSectors(ov, buf, 1000, 0), VDDR_RSLT_NORMAL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    CHECK(ov->ReadPage(ov, buf, 1, 6) == VDDR_RSLT_FAIL); /* page 1 of 64 sectors: past the end */
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
    CHECK(ov->ReadPage(ov, buf, 0, 40) == VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(cow->InsertSectors(cow, 65, 1), COW_ERR_INVBLOCK);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
    CHECK_EQ_U64(cow->InsertSectors(cow, -1, 1), COW_ERR_INVBLOCK);
    CHECK_EQ_U64(cow->DeleteSectors(cow, 60, 5), COW_ERR_INVBLOCK);
    CHECK_EQ_U64(cow->DiscardSectors(cow, 0, -2), COW_ERR_INVBLOCK);
    /* BlockStatus: out-of-range sectors are NOTALLOC, not a failure (the
     * legacy header's rule). */
    CHECK_EQ_U64(ov->BlockStatus(ov, 64, 70), VDDR_RSLT_NOTALLOC);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    CHECK_EQ_U64(ov->BlockStatus(ov, -10, -1), VDDR_RSLT_NOTALLOC);
    CHECK_EQ_U64(ov->BlockStatus(ov, 10, 5), VDDR_RSLT_NOTALLOC); /* empty */
    CHECK_EQ_U64(ov->BlockStatus(ov, 60, 1000), VDDR_RSLT_NORMAL); /* clipped */
    CHECK_EQ_U64(ov->BlockStatus(ov, -5, 0), VDDR_RSLT_NORMAL);    /* clipped */
    CHECK_EQ_U64(COW_BlockStatus(NULL, 64, 70), VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    /* The invalid move: from <= to <= from + n, at both edges. */
    CHECK_EQ_U64(cow->MoveSectors(cow, 10, 10, 5), COW_ERR_INVALIDMOVE);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALIDMOVE);
    CHECK_EQ_U64(cow->MoveSectors(cow, 10, 15, 5), COW_ERR_INVALIDMOVE);
    CHECK_EQ_U64(COW_MoveSectorsEx(cow, 10, 15, 5), COW_ERR_INVALIDMOVE);
    CHECK_EQ_U64(cow->MoveSectors(cow, 10, 16, 5), COW_ERR_NONE);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);

    /* Strings: the fixed texts, and PSTR-style assignment compiles. */
    s = COW_GetErrorString(COW_ERR_INVALIDMOVE);
    CHECK(strcmp(s, "invalid move: the destination lies inside the moved range") == 0);
    CHECK(strcmp(COW_GetErrorString(COW_ERR_INVHANDLE), "invalid handle") == 0);
    CHECK(strcmp(COW_GetErrorString(COW_ERR_INVBLOCK), "sector range outside the drive") == 0);
    CHECK(strcmp(COW_GetErrorString(COW_ERR_NONE), "no error") == 0);
    CHECK(strcmp(COW_GetErrorString(0x12345u), "unknown error code") == 0);
    CHECK_EQ_U64(cow->MoveSectors(cow, 0, 3, 5), COW_ERR_INVALIDMOVE);
    s = COW_GetErrorString(0xFFFFFFFFu);
    CHECK(strstr(s, "invalid move") != NULL && strstr(s, "destination 3") != NULL);
    /* Reading the error does not reset it. */
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALIDMOVE);

    CHECK(ov->Close(ov) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    /* A closed handle is refused. */
    CHECK(COW_GetDriveSize(ov, &size) == 0);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);
    CHECK(COW_Close(ov) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(path)));
    unlink(path);
    return tu_finish("error_paths");
}
