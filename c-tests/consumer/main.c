/* A consumer of the installed library: opens an overlay over its own C
 * source object (so it needs no files), writes and reads one sector. */
#include <stdio.h>
#include <string.h>
#include "cow.h"

typedef struct { VDDR vddr; } ZeroDisk;

/* The method table has the legacy member types: BOOL and UINT are
 * unsigned int, HUGE is long long. */
static unsigned int zd_size(HVDDR h, long long *bytes) { (void)h; *bytes = 64 * 512; return 1; }
static int zd_read(HVDDR h, void *buf, long long lba, unsigned int n)
{
    (void)h; (void)lba;
    memset(buf, 0, (size_t)n * 512);
    return VDDR_RSLT_NOTALLOC;
}

int main(void)
{
    ZeroDisk disk;
    unsigned char sector[512], back[512];
    HVDDR ov;
    memset(&disk, 0, sizeof disk);
    disk.vddr.GetDriveSize = zd_size;
    disk.vddr.ReadSectors = zd_read;
    ov = COW_CreateCowOverlay((HVDDR)&disk);
    if (!ov) { fprintf(stderr, "create: %s\n", COW_GetErrorString(COW_LAST_ERROR)); return 1; }
    memset(sector, 0x5A, sizeof sector);
    if (((HCOW)ov)->WriteSectors((HCOW)ov, sector, 3, 1) != VDDR_RSLT_NORMAL) return 2;
    if (((HCOW)ov)->InsertSectors((HCOW)ov, 0, 1) != COW_ERR_NONE) return 6; /* 0 = no error */
    if (((HCOW)ov)->MoveSectors((HCOW)ov, 0, 0, 1) != COW_ERR_INVALIDMOVE) return 7;
    if (ov->ReadSectors(ov, back, 4, 1) != VDDR_RSLT_NORMAL) return 3;
    if (memcmp(sector, back, sizeof back) != 0) return 4;
    ov = ov->Close(ov);
    if (COW_GetVersion() != ((COWDISK_VERSION_MAJOR << 16) | (COWDISK_VERSION_MINOR << 8) |
                             COWDISK_VERSION_PATCH)) return 8;
    printf("consumer ok, library version %#x\n", COW_GetVersion());
    return ov == NULL ? 0 : 5;
}
