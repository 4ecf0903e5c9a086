/* nbdkit-cowdisk-plugin: serves a cowdisk copy-on-write overlay over NBD.
 *
 *   nbdkit ./nbdkit-cowdisk-plugin.so file=disk.vdi [store=work.cow]
 *          [readonly=true] [granularity=SECTORS] [follow-parents=true]
 *
 * The source image (any format VDDR_Open reads) is never written; writes,
 * trims and zeroes go to the overlay, which lives in `store` (created if
 * it does not exist, reopened - with the library's source-identity check -
 * if it does) or, without `store`, in an anonymous store that vanishes at
 * exit. See docs/NBD.md.
 *
 * One overlay serves every connection: a persistent store can be open by
 * one writer only, and sharing it is what makes multi-conn truthful (a
 * flush on any connection flushes everything). The library is thread-safe
 * and serialises the calls on one handle, so the plugin runs in nbdkit's
 * PARALLEL thread model and adds only one lock of its own, around the
 * read-modify-write of partial sectors. */
#define _POSIX_C_SOURCE 200809L
#define NBDKIT_API_VERSION 2

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <nbdkit-plugin.h>

#include "cowdisk.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#ifndef COWDISK_PLUGIN_VERSION
#define COWDISK_PLUGIN_VERSION "unknown"
#endif

#define SECTOR 512u

/* Zeroes without MAY_TRIM are written from this buffer, a chunk at a time
 * (the library's write takes a non-const pointer; it only reads it). */
#define ZERO_CHUNK_SECTORS 2048u
static unsigned char zero_chunk[ZERO_CHUNK_SECTORS * SECTOR];

/* In extents, source ranges are asked about in probes of this many
 * sectors (4 KiB): COW_BlockStatus gives one combined status per range
 * (any data: NORMAL, else any known zero: BLANKPAGE, else NOTALLOC), so
 * data and zero runs are known at this resolution (a probe holding any
 * data is reported as data, one holding known zeros and holes as zero,
 * which are both safe). Only NOTALLOC is exact for a whole range, so
 * holes are grown by doubling. */
#define PROBE_SECTORS 8u
/* One extents call stops after about this many status calls (at least one
 * extent is always returned; clients ask again from where it stopped). */
#define STATUS_CALLS_PER_REQUEST 65536u

/* Configuration. */
static char *source_path;
static char *store_path;
static int readonly_store;
static int follow_parents;
/* The copy-on-write unit of a new overlay, in sectors. 64 KiB, the size
 * of a qcow2 cluster and of nbdkit's cow filter blocks, rather than the
 * library's legacy 1 MiB: a small write into a fresh unit copies the whole
 * unit, and NBD clients (VMs, mkfs) scatter small writes. Reads do not
 * depend on it (docs/NBD.md has the figures). */
#define DEFAULT_GRANULARITY 128u
static uint32_t granularity = DEFAULT_GRANULARITY;
static int granularity_given;

/* The overlay every connection shares, opened in get_ready. */
static HVDDR overlay;
static uint64_t drive_bytes;
/* Serialises read-modify-write of partial sectors: two requests writing
 * disjoint bytes of one sector must not lose each other's bytes. */
static pthread_mutex_t partial_sector_lock = PTHREAD_MUTEX_INITIALIZER;

static HCOW cow(void) { return (HCOW)overlay; }

static int errno_of(uint32_t code)
{
    switch (code) {
    case COW_ERR_OUTOFMEM: return ENOMEM;
    case COW_ERR_INVBLOCK: return EINVAL;
    case COW_ERR_INVALID_ARG: return EINVAL;
    case COW_ERR_READ_ONLY: return EROFS;
    case COW_ERR_NO_SPACE: return ENOSPC;
    case COW_ERR_UNSUPPORTED: return ENOTSUP;
    default: return EIO;
    }
}

/* Logs the library's message for the failed call `what` and sets the
 * error nbdkit sends to the client. Returns -1. */
static int library_failure(const char *what)
{
    uint32_t code = COW_GetLastError();
    nbdkit_error("%s: %s", what, COW_GetErrorString(COW_LAST_ERROR));
    nbdkit_set_error(errno_of(code));
    return -1;
}

/* Logs the library's message about `path`, naming the path first unless
 * the message already does. */
static void report_about(const char *path, const char *text)
{
    if (strstr(text, path))
        nbdkit_error("%s", text);
    else
        nbdkit_error("%s: %s", path, text);
}

static void cowdisk_unload(void)
{
    free(source_path);
    free(store_path);
}

static int parse_flag(const char *key, const char *value, int *out)
{
    int r = nbdkit_parse_bool(value);
    if (r == -1) return -1;
    (void)key;
    *out = r;
    return 0;
}

static int cowdisk_config(const char *key, const char *value)
{
    if (strcmp(key, "file") == 0) {
        /* Not nbdkit_realpath: a missing file is reported by the library,
         * with its own message, when the server gets ready. */
        free(source_path);
        source_path = nbdkit_absolute_path(value);
        return source_path ? 0 : -1;
    }
    if (strcmp(key, "store") == 0) {
        free(store_path);
        store_path = nbdkit_absolute_path(value);
        return store_path ? 0 : -1;
    }
    if (strcmp(key, "readonly") == 0) return parse_flag(key, value, &readonly_store);
    if (strcmp(key, "follow-parents") == 0) return parse_flag(key, value, &follow_parents);
    if (strcmp(key, "granularity") == 0) {
        if (nbdkit_parse_uint32_t("granularity", value, &granularity) == -1) return -1;
        granularity_given = 1;
        return 0;
    }
    nbdkit_error("unknown parameter '%s' (nbdkit cowdisk --help lists them)", key);
    return -1;
}

static int cowdisk_config_complete(void)
{
    if (!source_path) {
        nbdkit_error("file=<source image> is required");
        return -1;
    }
    return 0;
}

#define cowdisk_config_help                                                     \
    "file=<IMAGE>         (required) The source image (raw, VDI, VHD, VHDX,\n"  \
    "                     VMDK, qcow2, Parallels, UML COW, VCI); never written.\n" \
    "store=<STORE>        A persistent overlay store: reopened if it exists,\n" \
    "                     created if not. Default: an anonymous overlay.\n"     \
    "readonly=true        Open the store read-only (it must exist).\n"          \
    "granularity=<N>      Copy-on-write unit in sectors of a new overlay\n"    \
    "                     (default 128 = 64 KiB).\n"                            \
    "follow-parents=true  Open parent/backing images named inside the image."

static void cowdisk_dump_plugin(void)
{
    uint32_t v = COW_GetVersion();
    printf("cowdisk_library_version=%u.%u.%u\n", (unsigned)(v >> 16),
           (unsigned)((v >> 8) & 0xFF), (unsigned)(v & 0xFF));
}

static int store_exists(void)
{
    struct stat st;
    return lstat(store_path, &st) == 0;
}

/* Opens the source and the overlay before the server listens, so every
 * refusal reaches the user and nbdkit does not start. */
static int cowdisk_get_ready(void)
{
    HVDDR src;
    COW_OPTIONS options;
    int existing = store_path && store_exists();

    if (existing && granularity_given) {
        nbdkit_error("%s: granularity= only applies to a new store; an existing "
                     "store keeps the granularity it was created with",
                     store_path);
        return -1;
    }
    if (readonly_store && store_path && !existing) {
        nbdkit_error("%s: no such store (readonly=true opens an existing store "
                     "and never creates one)",
                     store_path);
        return -1;
    }
    src = VDDR_OpenEx(source_path, follow_parents ? COW_OPEN_FOLLOW_PARENTS : 0);
    if (!src) {
        report_about(source_path, COW_GetErrorString(COW_LAST_ERROR));
        return -1;
    }

    if (existing) {
        overlay = COW_OpenCowOverlay(store_path, src,
                                     readonly_store ? COW_OPEN_READ_ONLY : 0);
    } else {
        COW_InitOptions(&options);
        options.granularity = granularity;
        options.store_path = store_path;
        overlay = COW_CreateCowOverlayEx(src, &options);
    }
    if (!overlay) {
        /* Keep the message: closing the source resets the last error. */
        uint32_t code = COW_GetLastError();
        char *text = strdup(COW_GetErrorString(COW_LAST_ERROR));
        COW_Close(src);
        report_about(store_path ? store_path : source_path,
                     text ? text : COW_GetErrorString(code));
        free(text);
        return -1;
    }
    if (!COW_GetDriveSize(overlay, &drive_bytes)) {
        library_failure("size of the overlay");
        overlay = COW_Close(overlay);
        return -1;
    }
    nbdkit_debug("cowdisk: %s over %s, %" PRIu64 " bytes%s",
                 store_path ? store_path : "anonymous overlay", source_path,
                 drive_bytes, readonly_store ? ", read-only" : "");
    return 0;
}

/* Closing flushes a persistent store and checkpoints its log. */
static void cowdisk_cleanup(void)
{
    if (!overlay) return;
    overlay = COW_Close(overlay);
    if (COW_GetLastError() != COW_ERR_NONE)
        nbdkit_error("closing the overlay: %s", COW_GetErrorString(COW_LAST_ERROR));
}

static void *cowdisk_open(int readonly)
{
    (void)readonly;
    /* Every connection shares the one overlay; the handle only has to be
     * non-NULL. */
    return &overlay;
}

static int64_t cowdisk_get_size(void *handle)
{
    (void)handle;
    return (int64_t)drive_bytes;
}

static int cowdisk_can_write(void *handle)
{
    (void)handle;
    return !readonly_store;
}

static int cowdisk_true(void *handle)
{
    (void)handle;
    return 1;
}

static int cowdisk_can_fua(void *handle)
{
    (void)handle;
    return NBDKIT_FUA_NATIVE;
}

static int flush_if_fua(uint32_t flags)
{
    if ((flags & NBDKIT_FLAG_FUA) && COW_Flush(cow()) != COW_ERR_NONE)
        return library_failure("flush");
    return 0;
}

/* Reads whole sectors [lba, lba + n). */
static int read_sectors(void *buf, uint64_t lba, uint64_t n)
{
    if (n && COW_ReadSectors(overlay, buf, lba, (uint32_t)n) == VDDR_RSLT_FAIL)
        return library_failure("read");
    return 0;
}

static int write_sectors(const void *buf, uint64_t lba, uint64_t n)
{
    /* The library only reads the buffer (its legacy signature is not const). */
    if (n && COW_WriteSectors(cow(), (void *)(uintptr_t)buf, lba, (uint32_t)n) ==
                 VDDR_RSLT_FAIL)
        return library_failure("write");
    return 0;
}

/* Replaces bytes [within, within + len) of sector `lba` with `data` (NULL:
 * zeros), keeping the rest of the sector. */
static int patch_sector(uint64_t lba, uint32_t within, uint32_t len, const void *data)
{
    unsigned char sector[SECTOR];
    int r;
    pthread_mutex_lock(&partial_sector_lock);
    r = read_sectors(sector, lba, 1);
    if (r == 0) {
        if (data)
            memcpy(sector + within, data, len);
        else
            memset(sector + within, 0, len);
        r = write_sectors(sector, lba, 1);
    }
    pthread_mutex_unlock(&partial_sector_lock);
    return r;
}

/* A byte range cut at sector boundaries: a partial head sector, whole
 * sectors, a partial tail sector. */
struct split {
    uint64_t head_lba;
    uint32_t head_within, head_len; /* head_len 0: no partial head */
    uint64_t body_lba, body_sectors;
    uint64_t tail_lba;
    uint32_t tail_len; /* tail_len 0: no partial tail (starts at byte 0) */
};

static struct split split_range(uint64_t offset, uint32_t count)
{
    struct split s;
    uint64_t end = offset + count;
    memset(&s, 0, sizeof s);
    s.head_lba = offset / SECTOR;
    s.head_within = (uint32_t)(offset % SECTOR);
    if (s.head_within) {
        uint64_t to = (s.head_lba + 1) * SECTOR;
        s.head_len = (uint32_t)((end < to ? end : to) - offset);
        offset += s.head_len;
    }
    s.body_lba = offset / SECTOR;
    s.body_sectors = end > offset ? (end - offset) / SECTOR : 0;
    s.tail_lba = s.body_lba + s.body_sectors;
    if (end > offset && (end - offset) % SECTOR) s.tail_len = (uint32_t)((end - offset) % SECTOR);
    return s;
}

static int cowdisk_pread(void *handle, void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags)
{
    unsigned char sector[SECTOR];
    unsigned char *out = buf;
    struct split s = split_range(offset, count);
    (void)handle;
    (void)flags;
    if (s.head_len) {
        if (read_sectors(sector, s.head_lba, 1) == -1) return -1;
        memcpy(out, sector + s.head_within, s.head_len);
        out += s.head_len;
    }
    if (read_sectors(out, s.body_lba, s.body_sectors) == -1) return -1;
    out += s.body_sectors * SECTOR;
    if (s.tail_len) {
        if (read_sectors(sector, s.tail_lba, 1) == -1) return -1;
        memcpy(out, sector, s.tail_len);
    }
    return 0;
}

static int cowdisk_pwrite(void *handle, const void *buf, uint32_t count,
                          uint64_t offset, uint32_t flags)
{
    const unsigned char *in = buf;
    struct split s = split_range(offset, count);
    (void)handle;
    if (s.head_len) {
        if (patch_sector(s.head_lba, s.head_within, s.head_len, in) == -1) return -1;
        in += s.head_len;
    }
    if (write_sectors(in, s.body_lba, s.body_sectors) == -1) return -1;
    in += s.body_sectors * SECTOR;
    if (s.tail_len && patch_sector(s.tail_lba, 0, s.tail_len, in) == -1) return -1;
    return flush_if_fua(flags);
}

static int cowdisk_flush(void *handle, uint32_t flags)
{
    (void)handle;
    (void)flags;
    if (COW_Flush(cow()) != COW_ERR_NONE) return library_failure("flush");
    return 0;
}

static int discard_sectors(uint64_t lba, uint64_t n)
{
    if (n && COW_DiscardSectors(cow(), lba, n) != COW_ERR_NONE)
        return library_failure("discard");
    return 0;
}

/* Trim is advisory: only the whole sectors inside the range are
 * discarded (they then read as zeros); partial sectors are left as they
 * are. */
static int cowdisk_trim(void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
    struct split s = split_range(offset, count);
    (void)handle;
    if (discard_sectors(s.body_lba, s.body_sectors) == -1) return -1;
    return flush_if_fua(flags);
}

/* Whole sectors are discarded when the client allows holes (MAY_TRIM),
 * which only changes the map: that is the fast zero. Otherwise, and for
 * partial sectors, zeros are written; a FAST_ZERO request that would need
 * that fails with ENOTSUP before anything changes, as NBD asks. */
static int cowdisk_zero(void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
    struct split s = split_range(offset, count);
    int may_trim = (flags & NBDKIT_FLAG_MAY_TRIM) != 0;
    uint64_t lba, n;
    (void)handle;
    if ((flags & NBDKIT_FLAG_FAST_ZERO) &&
        (s.head_len || s.tail_len || (s.body_sectors && !may_trim))) {
        nbdkit_set_error(ENOTSUP);
        return -1;
    }
    if (s.head_len && patch_sector(s.head_lba, s.head_within, s.head_len, NULL) == -1)
        return -1;
    if (may_trim) {
        if (discard_sectors(s.body_lba, s.body_sectors) == -1) return -1;
    } else {
        for (lba = s.body_lba; lba < s.body_lba + s.body_sectors; lba += n) {
            n = s.body_lba + s.body_sectors - lba;
            if (n > ZERO_CHUNK_SECTORS) n = ZERO_CHUNK_SECTORS;
            if (write_sectors(zero_chunk, lba, n) == -1) return -1;
        }
    }
    if (s.tail_len && patch_sector(s.tail_lba, 0, s.tail_len, NULL) == -1) return -1;
    return flush_if_fua(flags);
}

static uint32_t extent_type_of_status(uint32_t status)
{
    switch (status) {
    case VDDR_RSLT_NORMAL: return 0;
    case VDDR_RSLT_BLANKPAGE: return NBDKIT_EXTENT_ZERO;
    default: return NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO;
    }
}

/* Builds contiguous extents in sectors, merging equal neighbours. */
struct extent_run {
    struct nbdkit_extents *out;
    uint64_t start, length; /* the pending run */
    uint32_t type;
};

static int emit(struct extent_run *run, uint64_t lba, uint64_t n, uint32_t type)
{
    if (run->length && run->type == type && run->start + run->length == lba) {
        run->length += n;
        return 0;
    }
    if (run->length) {
        if (nbdkit_add_extent(run->out, run->start * SECTOR, run->length * SECTOR,
                              run->type) == -1)
            return -1;
    }
    run->start = lba;
    run->length = n;
    run->type = type;
    return 0;
}

/* Status of [lba, lba + n) of the overlay, stored in *status; -1 on failure. */
static int status_of(uint64_t lba, uint64_t n, uint32_t *status, unsigned *calls)
{
    *status = COW_BlockStatus(overlay, lba, lba + n - 1);
    ++*calls;
    if (*status == VDDR_RSLT_FAIL) return library_failure("block status");
    return 0;
}

/* Describes the source-mapped sectors [*lba, end) of the overlay and
 * advances *lba; stops early when the call budget is spent, but always
 * describes at least one probe. */
static int describe_source_range(struct extent_run *run, uint64_t *lba, uint64_t end,
                                 unsigned *calls)
{
    do {
        /* One probe, up to the next probe boundary. */
        uint64_t at = *lba, n = PROBE_SECTORS - at % PROBE_SECTORS;
        uint32_t status, wider;
        if (n > end - at) n = end - at;
        if (status_of(at, n, &status, calls) == -1) return -1;
        if (status == VDDR_RSLT_NOTALLOC) {
            /* A hole: double the run while the whole of it is still a
             * hole (exact: NOTALLOC means no sector in it is anything else). */
            uint64_t step = PROBE_SECTORS;
            while (at + n < end && *calls < STATUS_CALLS_PER_REQUEST) {
                uint64_t more = step < end - (at + n) ? step : end - (at + n);
                if (status_of(at + n, more, &wider, calls) == -1) return -1;
                if (wider != status) break;
                n += more;
                step *= 2;
            }
        }
        if (emit(run, at, n, extent_type_of_status(status)) == -1) return -1;
        *lba = at + n;
    } while (*lba < end && *calls < STATUS_CALLS_PER_REQUEST);
    return 0;
}

/* Holes and zeros from the overlay's map: inserted or discarded space and
 * reserved-but-unwritten store space are holes, store space over known
 * zeros is zero, written store space is data, and source-mapped ranges
 * take the source's own status. */
static int cowdisk_extents(void *handle, uint32_t count, uint64_t offset,
                           uint32_t flags, struct nbdkit_extents *extents)
{
    struct extent_run run;
    uint64_t total = drive_bytes / SECTOR;
    uint64_t lba = offset / SECTOR;
    uint64_t end = (offset + count + SECTOR - 1) / SECTOR;
    unsigned calls = 0;
    (void)handle;
    memset(&run, 0, sizeof run);
    run.out = extents;
    if (end > total) end = total;
    do {
        COW_EXTENT e;
        uint64_t piece_end;
        if (COW_GetExtentAt(cow(), lba, &e) != COW_ERR_NONE)
            return library_failure("extent map");
        calls++;
        piece_end = e.start + e.length < end ? e.start + e.length : end;
        switch (e.kind) {
        case COW_EXTENT_SOURCE:
            if (describe_source_range(&run, &lba, piece_end, &calls) == -1) return -1;
            continue;
        case COW_EXTENT_STORE:
            if (emit(&run, lba, piece_end - lba, 0) == -1) return -1;
            break;
        case COW_EXTENT_STORE_ZERO:
            if (emit(&run, lba, piece_end - lba, NBDKIT_EXTENT_ZERO) == -1) return -1;
            break;
        default: /* NONE, STORE_HOLE */
            if (emit(&run, lba, piece_end - lba, NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) ==
                -1)
                return -1;
            break;
        }
        lba = piece_end;
    } while (lba < end && calls < STATUS_CALLS_PER_REQUEST &&
             !(flags & NBDKIT_FLAG_REQ_ONE));
    /* The pending run. */
    if (run.length &&
        nbdkit_add_extent(extents, run.start * SECTOR, run.length * SECTOR, run.type) == -1)
        return -1;
    return 0;
}

static struct nbdkit_plugin plugin = {
    .name = "cowdisk",
    .longname = "cowdisk copy-on-write overlay",
    .version = COWDISK_PLUGIN_VERSION,
    .description = "Serves a disk image through a cowdisk copy-on-write overlay "
                   "(the source is never written)",
    .unload = cowdisk_unload,
    .config = cowdisk_config,
    .config_complete = cowdisk_config_complete,
    .config_help = cowdisk_config_help,
    .magic_config_key = "file",
    .dump_plugin = cowdisk_dump_plugin,
    .get_ready = cowdisk_get_ready,
    .cleanup = cowdisk_cleanup,
    .open = cowdisk_open,
    .get_size = cowdisk_get_size,
    .can_write = cowdisk_can_write,
    .can_flush = cowdisk_true,
    .can_trim = cowdisk_true,
    .can_zero = cowdisk_true,
    .can_fast_zero = cowdisk_true,
    .can_fua = cowdisk_can_fua,
    .can_multi_conn = cowdisk_true,
    .can_extents = cowdisk_true,
    .pread = cowdisk_pread,
    .pwrite = cowdisk_pwrite,
    .flush = cowdisk_flush,
    .trim = cowdisk_trim,
    .zero = cowdisk_zero,
    .extents = cowdisk_extents,
    .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN(plugin)
