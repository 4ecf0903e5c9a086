/* "cmem": a tiny format served by a C COW_BACKEND table, for the Rust
 * tests. A file is a 512-byte header (8 magic bytes, then at byte 16 one
 * presence byte per sector, at most 256 sectors) followed by the sectors.
 * pfnOpen loads it into memory; pfnRead serves runs of present sectors
 * and answers COW_ERR_BLOCK_FREE for runs of absent ones. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowdisk.h"

#define MAX_SECTORS 256u
static const char MAGIC[8] = {'C', 'M', 'E', 'M', 'F', 'M', 'T', '2'};

typedef struct {
    uint64_t sectors;
    unsigned char present[MAX_SECTORS];
    unsigned char *data;
} CMem;

static int close_calls;

static int cm_probe(const char *filename)
{
    char head[8];
    FILE *f = fopen(filename, "rb");
    int ok;
    if (!f) return (int)COW_ERR_OPEN;
    ok = fread(head, 1, 8, f) == 8 && memcmp(head, MAGIC, 8) == 0;
    fclose(f);
    return ok ? (int)COW_ERR_NONE : (int)COW_ERR_UNSUPPORTED;
}

static int cm_open(const char *filename, uint32_t flags, void **out)
{
    unsigned char head[512];
    CMem *m;
    FILE *f;
    long size;
    if (flags & COW_OPEN_READ_WRITE) return (int)COW_ERR_READ_ONLY;
    f = fopen(filename, "rb");
    if (!f) return (int)COW_ERR_OPEN;
    if (fread(head, 1, 512, f) != 512 || memcmp(head, MAGIC, 8) != 0 || fseek(f, 0, SEEK_END) != 0 ||
        (size = ftell(f)) < 512 || (size - 512) % 512 != 0 || (size - 512) / 512 > (long)MAX_SECTORS) {
        fclose(f);
        return (int)COW_ERR_CORRUPT;
    }
    m = calloc(1, sizeof *m);
    if (!m) { fclose(f); return (int)COW_ERR_OUTOFMEM; }
    m->sectors = (uint64_t)(size - 512) / 512;
    memcpy(m->present, head + 16, (size_t)m->sectors);
    m->data = malloc((size_t)m->sectors * 512 + 1);
    if (!m->data || fseek(f, 512, SEEK_SET) != 0 ||
        fread(m->data, 1, (size_t)m->sectors * 512, f) != (size_t)m->sectors * 512) {
        fclose(f);
        free(m->data);
        free(m);
        return (int)COW_ERR_CORRUPT;
    }
    fclose(f);
    *out = m;
    return (int)COW_ERR_NONE;
}

static int cm_close(void *p, int del)
{
    CMem *m = p;
    (void)del;
    close_calls++;
    free(m->data);
    free(m);
    return (int)COW_ERR_NONE;
}

static int cm_read(void *p, uint64_t off, size_t cb, void *buf, size_t *done)
{
    CMem *m = p;
    uint64_t s = off / 512, n = cb / 512, run = 1;
    if (off % 512 || cb % 512 || cb == 0 || s + n > m->sectors) return (int)COW_ERR_INVBLOCK;
    while (run < n && m->present[s + run] == m->present[s]) run++;
    *done = (size_t)run * 512;
    if (!m->present[s]) return (int)COW_ERR_BLOCK_FREE;
    memcpy(buf, m->data + s * 512, (size_t)run * 512);
    return (int)COW_ERR_NONE;
}

static uint64_t cm_size(void *p) { return ((CMem *)p)->sectors * 512; }
static unsigned cm_flags(void *p) { (void)p; return 0; }

static COW_BACKEND table;

/* The table, filled once (not registered: the test does that). */
const COW_BACKEND *cmem_backend(void)
{
    if (table.u32Version == 0) {
        if (COW_InitBackend(&table) != (int)COW_ERR_NONE) return NULL;
        table.pszBackendName = "cmem";
        table.uBackendCaps = COW_CAP_FILE;
        table.pfnProbe = cm_probe;
        table.pfnOpen = cm_open;
        table.pfnClose = cm_close;
        table.pfnRead = cm_read;
        table.pfnGetSize = cm_size;
        table.pfnGetImageFlags = cm_flags;
    }
    return &table;
}

int cmem_close_calls(void) { return close_calls; }
