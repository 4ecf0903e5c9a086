/* A legacy-style client, compiled unchanged against our headers: it
 * includes cow.h first (which pulls in the legacy djtypes.h, as the legacy
 * vddr.h did) and djtypes.h again after it, uses the legacy types (HUGE,
 * UINT, BOOL, PSTR, CPFN, S_UUID) and checks every return value the way
 * legacy callers do: `if (cow->InsertSectors(...)) error`. It drives the
 * legacy enlarge flow over a legacy-style reader object (memr.c) and
 * checks every page's bytes and status against a naive model built here by
 * plain array splicing. Built as C (gnu99) and as C++, warnings as errors. */
#include "cow.h"
#include "djtypes.h"
#include "memr.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SECTORS 256u
#define INSERT_AT 100u
#define INSERTED 64u
#define P2_START 128u
#define P2_SECTORS 72u
#define P2_NEW 164u /* slid down into the inserted space */
#define PAGE_SHIFT 3u /* 8-sector pages */

static int failures;
#define EXPECT(cond, what)                                                      \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "legacy_client: line %d: %s\n", __LINE__, what);    \
            failures++;                                                         \
        }                                                                       \
    } while (0)

static BYTE source[SECTORS * 512];

/* The naive model: the drive's bytes and, per sector, 1 if it holds data. */
static BYTE model[(SECTORS + INSERTED) * 512];
static BYTE model_data[SECTORS + INSERTED];
static UINT model_sectors;

static void model_insert(UINT at, UINT n)
{
    memmove(model + (at + n) * 512, model + at * 512, (size_t)(model_sectors - at) * 512);
    memset(model + at * 512, 0, (size_t)n * 512);
    memmove(model_data + at + n, model_data + at, model_sectors - at);
    memset(model_data + at, 0, n);
    model_sectors += n;
}

static void model_move(UINT from, UINT to, UINT n) /* to < from here */
{
    BYTE *piece = (BYTE *)malloc((size_t)n * 512);
    BYTE flags[INSERTED + SECTORS];
    memcpy(piece, model + from * 512, (size_t)n * 512);
    memcpy(flags, model_data + from, n);
    memmove(model + (to + n) * 512, model + to * 512, (size_t)(from - to) * 512);
    memmove(model_data + to + n, model_data + to, from - to);
    memcpy(model + to * 512, piece, (size_t)n * 512);
    memcpy(model_data + to, flags, n);
    free(piece);
}

int main(void)
{
    HVDDR hdisk, hcow, hbad;
    HCOW cow;
    HUGE DriveSize = 0;
    BYTE mbr[512], page[8 * 512], sector[512];
    S_UUID uuid;
    PSTR text;
    UINT i, nPages, s;
    char path[] = "/tmp/cowdisk-legacy-XXXXXX";
    int fd;

    /* Partition 1 at 8..99 and partition 2 at 128..199 hold data (first
     * byte nonzero); the rest reads as never written. */
    for (s = 0; s < SECTORS; s++) {
        int data = s == 0 || (s >= 8 && s < 100) || (s >= P2_START && s < P2_START + P2_SECTORS);
        for (i = 0; i < 512; i++) source[s * 512 + i] = data ? (BYTE)(s * 3u + i + 1u) | 1u : 0;
        model_data[s] = (BYTE)data;
    }
    memcpy(model, source, sizeof source);
    model_sectors = SECTORS;

    hdisk = MEMR_Open(source, SECTORS, 0xFFFFFFFFu);
    EXPECT(hdisk != NULL, "MEMR_Open");
    if (!hdisk) return 1;
    EXPECT(hdisk->GetDriveSize(hdisk, &DriveSize) && DriveSize == (HUGE)SECTORS * 512,
           "the reader's own GetDriveSize");
    hdisk->ReadSectors(hdisk, mbr, 0, 1);

    hcow = COW_CreateCowOverlay(hdisk);
    EXPECT(hcow != NULL, "COW_CreateCowOverlay");
    if (!hcow) return 1;
    cow = (HCOW)hcow;

    /* The legacy enlarge: insert space after partition 1, slide partition
     * 2 down into it, patch the MBR. Error code 0 = no error. */
    if (cow->InsertSectors(cow, INSERT_AT, INSERTED)) EXPECT(0, "InsertSectors failed");
    model_insert(INSERT_AT, INSERTED);
    if (cow->MoveSectors(cow, P2_START + INSERTED, P2_NEW, P2_SECTORS))
        EXPECT(0, "MoveSectors failed");
    model_move(P2_START + INSERTED, P2_NEW, P2_SECTORS);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr[446] = 0x80;
    if (cow->WriteSectors(cow, mbr, 0, 1) != VDDR_RSLT_NORMAL) EXPECT(0, "WriteSectors failed");
    memcpy(model, mbr, 512);
    model_data[0] = 1;

    /* The invalid move returns its code; nothing changes. */
    EXPECT(cow->MoveSectors(cow, 10, 12, 5) == COW_ERR_INVALIDMOVE, "the invalid move's code");
    EXPECT(COW_GetLastError() == COW_ERR_INVALIDMOVE, "the invalid move's last error");
    text = COW_GetErrorString(0xFFFFFFFFu);
    EXPECT(text != NULL && strstr((const char *)text, "invalid move") != NULL, "its text");

    EXPECT(hcow->GetDriveSize(hcow, &DriveSize) &&
               DriveSize == (HUGE)(SECTORS + INSERTED) * 512,
           "the enlarged size");

    /* Every page: bytes as the model, status exact to the sector (a page
     * of never-written sectors is NOTALLOC, whatever the COW unit). */
    nPages = hcow->GetDriveBlockCount(hcow, PAGE_SHIFT);
    EXPECT(nPages == (SECTORS + INSERTED) >> PAGE_SHIFT, "GetDriveBlockCount");
    for (i = 0; i < nPages; i++) {
        HUGE first = (HUGE)i << PAGE_SHIFT, last = first + (1 << PAGE_SHIFT) - 1;
        int any = 0, rc;
        for (s = (UINT)first; s <= (UINT)last; s++) any |= model_data[s];
        rc = hcow->ReadPage(hcow, page, i, PAGE_SHIFT);
        EXPECT(rc == (any ? VDDR_RSLT_NORMAL : VDDR_RSLT_NOTALLOC), "a page's status");
        EXPECT(hcow->BlockStatus(hcow, first, last) ==
                   (UINT)(any ? VDDR_RSLT_NORMAL : VDDR_RSLT_NOTALLOC),
               "a page's BlockStatus");
        EXPECT(memcmp(page, model + first * 512, sizeof page) == 0, "a page's bytes");
    }
    /* Out-of-range LBAs are NOTALLOC (the legacy rule); zero sectors read
     * as NORMAL. */
    EXPECT(hcow->BlockStatus(hcow, 100000, 100007) == VDDR_RSLT_NOTALLOC, "out of range");
    EXPECT(hcow->ReadSectors(hcow, sector, 5, 0) == VDDR_RSLT_NORMAL, "zero sectors");

    /* The UUID comes from the reader, in the legacy union. */
    EXPECT(hcow->GetDriveUUID(hcow, &uuid) && uuid.au8[0] == 0xA0 && uuid.au8[15] == 0xAF &&
               uuid.Gen.u32TimeLow == 0xA3A2A1A0u,
           "the reader's UUID through the overlay");
    EXPECT(!hcow->IsSnapshot(hcow), "IsSnapshot");

    /* VDDR_LastError is the thread's last error: assignable, readable. */
    VDDR_LastError = 0x30099u;
    EXPECT(COW_GetLastError() == 0x30099u && VDDR_GetLastError() == 0x30099u,
           "an assigned VDDR_LastError is the last error");
    EXPECT(hcow->ReadSectors(hcow, sector, 0, 1) == VDDR_RSLT_NORMAL, "a read");
    EXPECT(VDDR_LastError == 0, "a call that succeeds clears it");

    hcow = hcow->Close(hcow);
    EXPECT(hcow == NULL, "Close returns NULL");
    EXPECT(MEMR_CloseCount() == 1, "closing the overlay closed the reader once");

    /* A reader's failure: its VDDR_LastError code is named in ours. */
    hbad = COW_CreateCowOverlay(MEMR_Open(source, SECTORS, 9));
    EXPECT(hbad != NULL, "an overlay over a failing reader");
    if (hbad) {
        EXPECT(hbad->ReadSectors(hbad, page, 8, 2) == VDDR_RSLT_FAIL, "the failing read");
        EXPECT(COW_GetLastError() == COW_ERR_READ, "COW_ERR_READ");
        text = VDDR_GetErrorString(0xFFFFFFFFu);
        EXPECT(text != NULL && strstr((const char *)text, "0x30002") != NULL,
               "the reader's own code in the text");
        hbad = hbad->Close(hbad);
    }

    /* VDDR_Open takes a CPFN. */
    memset(source + 100 * 512, 0, 512);
    fd = mkstemp(path);
    EXPECT(fd >= 0 && write(fd, source, sizeof source) == (ssize_t)sizeof source, "temp file");
    if (fd >= 0) close(fd);
    hdisk = VDDR_Open((CPFN)path, 0);
    EXPECT(hdisk != NULL && hdisk->GetDriveType(hdisk) == VDD_TYPE_RAW, "VDDR_Open(CPFN)");
    if (hdisk) hdisk = hdisk->Close(hdisk);
    /* The rest of the legacy vddr.h, with its legacy types: a raw image
     * has no UUID, and no media registry is beside it. */
    {
        BOOL ok = VDDR_QuickGetUUID((CPFN)path, &uuid);
        EXPECT(!ok && VDDR_GetLastError() == COW_ERR_UNSUPPORTED, "VDDR_QuickGetUUID of a raw image");
        EXPECT(VDDR_OpenByUUID(&uuid, 0) == NULL, "VDDR_OpenByUUID without a registry");
        (void)VDDR_OpenMediaRegistry; /* declared with BOOL (CPFN) */
    }
    unlink(path);

    if (failures) {
        fprintf(stderr, "legacy_client: %d check(s) failed\n", failures);
        return 1;
    }
    printf("legacy_client: all checks passed\n");
    return 0;
}
