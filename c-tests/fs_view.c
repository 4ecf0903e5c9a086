/* COW_OpenFilesystemView on a real FAT16 partition made by sfdisk,
 * mkfs.fat and mtools (a file copied in, another deleted): the report
 * names the filesystem and counts the free space fsck.fat counts, the
 * deleted file's bytes read as NOTALLOC zeros, the volume read back
 * through the view passes fsck.fat and gives the kept file back; the view
 * adopts the source on success only, and bad arguments leave it with the
 * caller. */
#include "testutil.h"
#include "cowdisk.h"

#define MIB (1024u * 1024u)
#define DISK_SECTORS (40u * 2048u)
#define PART_START 2048u
#define PART_SECTORS (32u * 2048u)

static const char marker[] = "--cowdisk C deleted-file marker--";

static int run(const char *cmd)
{
    int rc = system(cmd);
    if (rc != 0) fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
    return rc == 0;
}

/* Writes `size` bytes of `fill`-derived data to `path`. */
static int write_file(const char *path, size_t size, int marked)
{
    FILE *f = fopen(path, "wb");
    size_t i;
    if (!f) return 0;
    for (i = 0; i < size; i++) {
        int c = marked ? marker[i % (sizeof marker - 1)] : (int)((i * 131u + i / 512u) & 0xFF);
        if (fputc(c, f) == EOF) { fclose(f); return 0; }
    }
    return fclose(f) == 0;
}

/* (free clusters, bytes per cluster) from `fsck.fat -n -v`. */
static int fsck_fat_free(const char *image, uint64_t *free_clusters, uint64_t *cluster)
{
    char cmd[512], line[512];
    FILE *p;
    unsigned long long used = 0, total = 0, bytes = 0;
    int found = 0;
    snprintf(cmd, sizeof cmd, "fsck.fat -n -v '%s'", image);
    p = popen(cmd, "r");
    if (!p) return 0;
    while (fgets(line, sizeof line, p)) {
        char *slash = strrchr(line, '/');
        if (strstr(line, "bytes per cluster")) bytes = strtoull(line, NULL, 10);
        if (slash && strstr(line, " clusters")) {
            char *start = slash;
            while (start > line && start[-1] >= '0' && start[-1] <= '9') start--;
            used = strtoull(start, NULL, 10);
            total = strtoull(slash + 1, NULL, 10);
            found = 1;
        }
    }
    if (pclose(p) != 0 || !found || !bytes) return 0;
    *free_clusters = total - used;
    *cluster = bytes;
    return 1;
}

int main(void)
{
    char dir[64], cmd[2048], disk_path[128], part_path[128], view_path[128];
    char kept[128], gone[128], back[128];
    const char *tmp = getenv("TMPDIR");
    COW_FS_REGION regions[4];
    COW_FS_REPORT report;
    HVDDR disk, view;
    uint64_t free_clusters = 0, cluster = 0, lba;
    unsigned char *buf, one_sector[512];
    FILE *out;
    int marker_seen = 0;

    snprintf(dir, sizeof dir, "%s/cowdisk-fsview-XXXXXX", tmp ? tmp : "/tmp");
    CHECK(mkdtemp(dir) != NULL);
    snprintf(disk_path, sizeof disk_path, "%s/disk.raw", dir);
    snprintf(part_path, sizeof part_path, "%s/part.img", dir);
    snprintf(view_path, sizeof view_path, "%s/view.raw", dir);
    snprintf(kept, sizeof kept, "%s/kept.bin", dir);
    snprintf(gone, sizeof gone, "%s/gone.bin", dir);
    snprintf(back, sizeof back, "%s/back.bin", dir);
    CHECK(write_file(kept, 3 * MIB + 77, 0));
    CHECK(write_file(gone, 4 * MIB, 1));
    snprintf(cmd, sizeof cmd,
             "set -e; export MTOOLS_SKIP_CHECK=1; "
             "truncate -s %u '%s'; printf 'label: dos\\nstart=%u, size=%u, type=6\\n' "
             "| sfdisk --quiet '%s'; "
             "mkfs.fat -F 16 -C '%s' %u >/dev/null; "
             "mcopy -i '%s' '%s' ::/KEPT.BIN; mcopy -i '%s' '%s' ::/GONE.BIN; "
             "mdel -i '%s' ::/GONE.BIN; "
             "dd if='%s' of='%s' bs=512 seek=%u conv=notrunc status=none",
             DISK_SECTORS * 512u, disk_path, PART_START, PART_SECTORS, disk_path,
             part_path, PART_SECTORS / 2u, part_path, kept, part_path, gone,
             part_path, part_path, disk_path, PART_START);
    CHECK(run(cmd));
    CHECK(fsck_fat_free(part_path, &free_clusters, &cluster));

    disk = VDDR_OpenEx(disk_path, 0);
    CHECK(disk != NULL);

    /* Bad arguments: NULL, the caller keeps the source. */
    CHECK(COW_OpenFilesystemView(disk, 0x80, NULL) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    memset(&report, 0, sizeof report);
    report.struct_size = 4;
    CHECK(COW_OpenFilesystemView(disk, 0, &report) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    CHECK(COW_OpenFilesystemView(NULL, 0, NULL) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    report.regions = regions;
    report.region_capacity = 4;
    view = COW_OpenFilesystemView(disk, 0, &report);
    CHECK(view != NULL);
    /* The source now belongs to the view. */
    CHECK(COW_ReadSectors(disk, one_sector, 0, 1) == VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVHANDLE);

    CHECK_EQ_U64(report.region_count, 2);
    CHECK_EQ_U64(report.has_table, 1);
    CHECK_EQ_U64(report.disk_sectors, DISK_SECTORS);
    CHECK_EQ_U64(regions[0].number, 1);
    CHECK_EQ_U64(regions[0].filesystem, COW_FS_FAT16);
    CHECK_EQ_U64(regions[0].start, PART_START);
    CHECK_EQ_U64(regions[0].sectors, PART_SECTORS);
    CHECK_EQ_U64(regions[0].free_sectors, free_clusters * cluster / 512u);
    CHECK_EQ_U64(regions[0].used_sectors + regions[0].free_sectors, PART_SECTORS);
    CHECK(regions[0].reason[0] == '\0');
    CHECK_EQ_U64(regions[1].filesystem, COW_FS_UNPARTITIONED);
    CHECK_EQ_U64(regions[1].start, PART_START + PART_SECTORS);
    CHECK_EQ_U64(regions[1].free_sectors, DISK_SECTORS - PART_START - PART_SECTORS);
    CHECK_EQ_U64(report.free_sectors, regions[0].free_sectors + regions[1].free_sectors);

    /* Read the whole disk through the view; the tail is NOTALLOC. */
    buf = malloc(2048u * 512u);
    CHECK(buf != NULL);
    CHECK_EQ_U64(COW_ReadSectors(view, buf, PART_START + PART_SECTORS, 2048),
                 VDDR_RSLT_NOTALLOC);
    out = fopen(view_path, "wb");
    CHECK(out != NULL);
    for (lba = 0; buf && out && lba < DISK_SECTORS; lba += 2048) {
        size_t i;
        CHECK(COW_ReadSectors(view, buf, lba, 2048) != VDDR_RSLT_FAIL);
        for (i = 0; i + sizeof marker - 1 <= 2048u * 512u; i += 512)
            if (memcmp(buf + i, marker, sizeof marker - 1) == 0) marker_seen = 1;
        CHECK(fwrite(buf, 1, 2048u * 512u, out) == 2048u * 512u);
    }
    if (out) CHECK(fclose(out) == 0);
    free(buf);
    CHECK(!marker_seen);
    CHECK(COW_Close(view) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);

    /* The volume read through the view: fsck.fat clean, the kept file
     * identical. */
    snprintf(cmd, sizeof cmd,
             "set -e; export MTOOLS_SKIP_CHECK=1; "
             "dd if='%s' of='%s' bs=512 skip=%u count=%u status=none; "
             "fsck.fat -n '%s' >/dev/null; mcopy -i '%s' ::/KEPT.BIN '%s'; cmp '%s' '%s'",
             view_path, part_path, PART_START, PART_SECTORS, part_path, part_path, back,
             back, kept);
    CHECK(run(cmd));

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(run(cmd));
    return tu_finish("fs_view");
}
