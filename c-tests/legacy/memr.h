/* A legacy-style format reader: the shape of the legacy tool's own readers
 * (vdir.h, vhdr.h, ...), a subclass of the VDDR class that serves a disk
 * held in memory. Includes vddr.h the way the legacy readers do. */
#ifndef MEMR_H
#define MEMR_H

#include "vddr.h"

/* Reader error codes, in the legacy style: (drive type << 16) + n. */
#define MEMR_ERR_READ ((VDD_TYPE_RAW << 16) + 2)

HVDDR MEMR_Open(BYTE *data, UINT nSectors, UINT badSector);
/* A disk of nSectors over `data`; reading sector `badSector` fails with
 * MEMR_ERR_READ in VDDR_LastError (pass 0xFFFFFFFF for none). */

UINT MEMR_CloseCount(void);

#endif
