/* The legacy-style reader of memr.h, written as the legacy readers are: the
 * object embeds CLASS(VDDR) as its first member, fills the table with
 * functions of the legacy signatures without casts, and reports errors by
 * assigning the global VDDR_LastError. */
#include "djtypes.h"
#include "memr.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    CLASS(VDDR) Base; /* must be first */
    BYTE *data;
    UINT nSectors;
    UINT badSector;
    S_UUID uuid;
} MEMDISK, *PMEMDISK;

static UINT close_count;

PRIVATE UINT MEMR_GetDriveType(HVDDR pThis)
{
    (void)pThis;
    return VDD_TYPE_RAW;
}

PRIVATE BOOL MEMR_GetDriveSize(HVDDR pThis, HUGE *drive_size)
{
    *drive_size = (HUGE)((PMEMDISK)pThis)->nSectors * 512;
    VDDR_LastError = 0;
    return TRUE;
}

PRIVATE UINT MEMR_GetDriveBlockCount(HVDDR pThis, UINT SPBshift)
{
    return ((PMEMDISK)pThis)->nSectors >> SPBshift;
}

/* Sectors whose first byte is zero count as never allocated. */
PRIVATE UINT MEMR_BlockStatus(HVDDR pThis, HUGE LBA_start, HUGE LBA_end)
{
    PMEMDISK p = (PMEMDISK)pThis;
    HUGE s;
    for (s = LBA_start; s <= LBA_end && s < (HUGE)p->nSectors; s++)
        if (p->data[s * 512] != 0) return VDDR_RSLT_NORMAL;
    return VDDR_RSLT_NOTALLOC;
}

PRIVATE BOOL MEMR_GetDriveUUID(HVDDR pThis, S_UUID *drvuuid)
{
    *drvuuid = ((PMEMDISK)pThis)->uuid;
    return TRUE;
}

PRIVATE BOOL MEMR_IsSnapshot(HVDDR pThis)
{
    (void)pThis;
    return FALSE;
}

PRIVATE int MEMR_ReadSectors(HVDDR pThis, void *buffer, HUGE LBA, UINT nSectors)
{
    PMEMDISK p = (PMEMDISK)pThis;
    if (LBA < 0 || LBA + nSectors > (HUGE)p->nSectors) {
        VDDR_LastError = MEMR_ERR_READ;
        return VDDR_RSLT_FAIL;
    }
    if (p->badSector >= LBA && (HUGE)p->badSector < LBA + nSectors) {
        VDDR_LastError = MEMR_ERR_READ;
        return VDDR_RSLT_FAIL;
    }
    memcpy(buffer, p->data + LBA * 512, (size_t)nSectors * 512);
    VDDR_LastError = 0;
    return (int)MEMR_BlockStatus(pThis, LBA, LBA + nSectors - 1);
}

PRIVATE int MEMR_ReadPage(HVDDR pThis, void *buffer, UINT iPage, UINT SPBshift)
{
    return MEMR_ReadSectors(pThis, buffer, (HUGE)iPage << SPBshift, 1u << SPBshift);
}

PRIVATE HVDDR MEMR_Close(HVDDR pThis)
{
    close_count++;
    free(pThis);
    return NULL;
}

PUBLIC HVDDR MEMR_Open(BYTE *data, UINT nSectors, UINT badSector)
{
    PMEMDISK p = (PMEMDISK)calloc(1, sizeof(MEMDISK));
    UINT i;
    if (!p) return NULL;
    p->Base.GetDriveType = MEMR_GetDriveType;
    p->Base.GetDriveSize = MEMR_GetDriveSize;
    p->Base.GetDriveBlockCount = MEMR_GetDriveBlockCount;
    p->Base.BlockStatus = MEMR_BlockStatus;
    p->Base.GetDriveUUID = MEMR_GetDriveUUID;
    p->Base.IsSnapshot = MEMR_IsSnapshot;
    p->Base.ReadPage = MEMR_ReadPage;
    p->Base.ReadSectors = MEMR_ReadSectors;
    p->Base.Close = MEMR_Close;
    p->data = data;
    p->nSectors = nSectors;
    p->badSector = badSector;
    for (i = 0; i < 16; i++) p->uuid.au8[i] = (UI08)(0xA0 + i);
    return (HVDDR)p;
}

PUBLIC UINT MEMR_CloseCount(void)
{
    return close_count;
}
