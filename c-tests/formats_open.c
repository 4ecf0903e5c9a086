/* Opens one qemu-made image of each source format through VDDR_Open and
 * checks GetDriveType, GetDriveSize, BlockStatus of written and unwritten
 * ranges, and sectors' bytes against the qemu-io patterns that made them
 * (c-tests/make_format_images.cmake). Each image is checked unchanged.
 *
 * Usage: formats_open DIR   (DIR holds disk.raw, disk.vdi, ...) */
#include "testutil.h"
#include "cowdisk.h"

#define DISK_BYTES (4u * 1024u * 1024u)
#define DISK_SECTORS (DISK_BYTES / 512u)

struct image {
    const char *file;
    uint32_t type;
    int sparse; /* unwritten ranges are not reported as data */
};

static const struct image images[] = {
    {"disk.raw", VDD_TYPE_RAW, 0},
    {"disk.vdi", VDD_TYPE_VDI, 1},
    {"disk.hdd", VDD_TYPE_PARALLELS, 1},
    /* VHD blocks are 2 MiB and both were written; qemu allocates a block
     * with every sector present, so no range of this disk is unallocated. */
    {"disk.vhd", VDD_TYPE_VHD, 0},
    {"disk.vhdx", VDD_TYPE_VHDX, 1},
    {"disk.qcow2", VDD_TYPE_QCOW2, 1},
    {"disk.vmdk", VDD_TYPE_VMDK, 1},
};

/* The qemu-io writes: 0x11 over sector 0, 0x22 over 1 MiB + 64 KiB, 0x33
 * over the last 4 KiB; the rest was never written and reads as zeros. */
static unsigned char expected_byte(uint64_t sector)
{
    if (sector == 0) return 0x11;
    if (sector >= 2048 && sector < 2048 + 128) return 0x22;
    if (sector >= DISK_SECTORS - 8) return 0x33;
    return 0;
}

static int all_bytes(const unsigned char *buf, size_t len, unsigned char b)
{
    size_t i;
    for (i = 0; i < len; i++)
        if (buf[i] != b) return 0;
    return 1;
}

static void check_image(const char *dir, const struct image *img)
{
    /* Sectors read one at a time, and one multi-sector read across the
     * end of the 0x22 run. */
    static const uint64_t probes[] = {0, 1, 7, 2047, 2048, 2100, 2175, 2176,
                                      3000, 6000, DISK_SECTORS - 9,
                                      DISK_SECTORS - 8, DISK_SECTORS - 1};
    static unsigned char buf[16 * 512];
    char path[4096];
    tu_fingerprint before;
    HVDDR h;
    long long bytes = 0;
    size_t i;
    int rc;

    snprintf(path, sizeof path, "%s/%s", dir, img->file);
    before = tu_fingerprint_of(path);
    CHECK(before.size > 0);
    h = VDDR_Open(path, 0);
    if (!h) {
        fprintf(stderr, "%s: VDDR_Open failed\n", path);
        tu_failures++;
        return;
    }
    CHECK_EQ_U64(h->GetDriveType(h), img->type);
    CHECK(h->GetDriveSize(h, &bytes));
    CHECK_EQ_U64(bytes, DISK_BYTES);

    for (i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        uint64_t s = probes[i];
        unsigned char want = expected_byte(s);
        memset(buf, 0xEE, 512);
        rc = h->ReadSectors(h, buf, s, 1);
        CHECK(rc != VDDR_RSLT_FAIL);
        if (!all_bytes(buf, 512, want)) {
            fprintf(stderr, "%s: sector %llu is not all 0x%02x\n", path,
                    (unsigned long long)s, want);
            tu_failures++;
        }
        if (want != 0) CHECK_EQ_U64(rc, VDDR_RSLT_NORMAL);
    }
    memset(buf, 0xEE, sizeof buf);
    CHECK(h->ReadSectors(h, buf, 2168, 16) == VDDR_RSLT_NORMAL);
    CHECK(all_bytes(buf, 8 * 512, 0x22));
    CHECK(all_bytes(buf + 8 * 512, 8 * 512, 0));

    CHECK_EQ_U64(h->BlockStatus(h, 0, 0), VDDR_RSLT_NORMAL);
    CHECK_EQ_U64(h->BlockStatus(h, 2048, 2175), VDDR_RSLT_NORMAL);
    CHECK_EQ_U64(h->BlockStatus(h, 0, DISK_SECTORS - 1), VDDR_RSLT_NORMAL);
    /* 2.5 MiB .. 3 MiB was never written: a sparse format with blocks of
     * at most 1 MiB has not allocated it. */
    if (img->sparse && h->BlockStatus(h, 5120, 6143) == VDDR_RSLT_NORMAL) {
        fprintf(stderr, "%s: never-written sectors 5120..6143 are data\n", path);
        tu_failures++;
    }

    h = h->Close(h);
    CHECK(h == NULL);
    if (!tu_same_fingerprint(before, tu_fingerprint_of(path))) {
        fprintf(stderr, "%s: the source was modified\n", path);
        tu_failures++;
    }
}

int main(int argc, char **argv)
{
    size_t i;
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE_DIR\n", argv[0]);
        return 2;
    }
    for (i = 0; i < sizeof images / sizeof images[0]; i++)
        check_image(argv[1], &images[i]);
    return tu_finish("formats_open");
}
