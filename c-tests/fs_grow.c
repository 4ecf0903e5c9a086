/* COW_GrowFilesystem on a FAT16 volume made by mkfs.fat in the first half
 * of a partition (sfdisk): the report says FAT16 and the partition's size,
 * the dry run writes nothing, the grown volume cloned out passes
 * `fsck.fat -n` with the partition's sector count and gives its file back;
 * bad flags, a bad report, a disk that is not an overlay and a dirty
 * volume are refused with the overlay unchanged. */
#include "testutil.h"
#include "cowdisk.h"

#define MIB (1024u * 1024u)
#define DISK_SECTORS (40u * 2048u)
#define PART_START 2048u
#define PART_SECTORS (32u * 2048u)

static int run(const char *cmd)
{
    int rc = system(cmd);
    if (rc != 0) fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
    return rc == 0;
}

static int write_file(const char *path, size_t size)
{
    FILE *f = fopen(path, "wb");
    size_t i;
    if (!f) return 0;
    for (i = 0; i < size; i++)
        if (fputc((int)((i * 131u + i / 512u) & 0xFF), f) == EOF) { fclose(f); return 0; }
    return fclose(f) == 0;
}

/* Total sectors as `fsck.fat -n -v` reads them. */
static uint64_t fsck_total(const char *image)
{
    char cmd[512], line[512];
    FILE *p;
    unsigned long long total = 0;
    snprintf(cmd, sizeof cmd, "fsck.fat -n -v '%s'", image);
    p = popen(cmd, "r");
    if (!p) return 0;
    while (fgets(line, sizeof line, p))
        if (strstr(line, " sectors total")) total = strtoull(line, NULL, 10);
    if (pclose(p) != 0) return 0;
    return total;
}

static HVDDR overlay_of(const char *disk_path)
{
    HVDDR disk = VDDR_OpenEx(disk_path, 0);
    if (!disk) return NULL;
    return COW_CreateCowOverlay(disk);
}

int main(void)
{
    char dir[64], cmd[2048], disk_path[128], part_path[128], out_path[128], dirty_path[128];
    char file[128], back[128];
    const char *tmp = getenv("TMPDIR");
    COW_GROW_REPORT report;
    HVDDR ov, plain;
    unsigned char before[512], after[512];

    snprintf(dir, sizeof dir, "%s/cowdisk-fsgrow-XXXXXX", tmp ? tmp : "/tmp");
    CHECK(mkdtemp(dir) != NULL);
    snprintf(disk_path, sizeof disk_path, "%s/disk.raw", dir);
    snprintf(dirty_path, sizeof dirty_path, "%s/dirty.raw", dir);
    snprintf(part_path, sizeof part_path, "%s/part.img", dir);
    snprintf(out_path, sizeof out_path, "%s/out.raw", dir);
    snprintf(file, sizeof file, "%s/file.bin", dir);
    snprintf(back, sizeof back, "%s/back.bin", dir);
    CHECK(write_file(file, 3 * MIB + 77));
    /* The volume fills half the partition; dirty.raw is the same with
     * Linux's dirty bit (byte 0x25 of the boot sector) set. */
    snprintf(cmd, sizeof cmd,
             "set -e; export MTOOLS_SKIP_CHECK=1; "
             "truncate -s %u '%s'; printf 'label: dos\\nstart=%u, size=%u, type=6\\n' "
             "| sfdisk --quiet '%s'; "
             "mkfs.fat -F 16 -C '%s' %u >/dev/null; mcopy -i '%s' '%s' ::/FILE.BIN; "
             "dd if='%s' of='%s' bs=512 seek=%u conv=notrunc status=none; "
             "cp '%s' '%s'; printf '\\001' | dd of='%s' bs=1 seek=%u conv=notrunc status=none",
             DISK_SECTORS * 512u, disk_path, PART_START, PART_SECTORS, disk_path, part_path,
             PART_SECTORS / 4u, part_path, file, part_path, disk_path, PART_START, disk_path,
             dirty_path, dirty_path, PART_START * 512u + 0x25u);
    CHECK(run(cmd));

    ov = overlay_of(disk_path);
    CHECK(ov != NULL);
    /* Bad arguments. */
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)ov, PART_START, PART_SECTORS, 0x80, NULL),
                 COW_ERR_INVALID_ARG);
    memset(&report, 0, sizeof report);
    report.struct_size = 4;
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)ov, PART_START, PART_SECTORS, 0, &report),
                 COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)ov, DISK_SECTORS, PART_SECTORS, 0, NULL),
                 COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_GrowFilesystem(NULL, PART_START, PART_SECTORS, 0, NULL),
                 COW_ERR_INVHANDLE);
    plain = VDDR_OpenEx(disk_path, 0);
    CHECK(plain != NULL);
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)plain, PART_START, PART_SECTORS, 0, NULL),
                 COW_ERR_NOT_OVERLAY);
    CHECK(COW_Close(plain) == NULL);

    /* The dry run reports and writes nothing. */
    CHECK(COW_ReadSectors(ov, before, PART_START, 1) != VDDR_RSLT_FAIL);
    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)ov, PART_START, PART_SECTORS, COW_GROW_DRY_RUN,
                                    &report),
                 COW_ERR_NONE);
    CHECK_EQ_U64(report.filesystem, COW_FS_FAT16);
    CHECK_EQ_U64(report.old_sectors, PART_SECTORS / 2u);
    CHECK_EQ_U64(report.new_sectors, PART_SECTORS);
    CHECK(report.new_free_bytes > report.old_free_bytes + 15u * MIB);
    CHECK(COW_ReadSectors(ov, after, PART_START, 1) == VDDR_RSLT_NORMAL);
    CHECK(memcmp(before, after, 512) == 0);

    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)ov, PART_START, PART_SECTORS, 0, &report),
                 COW_ERR_NONE);
    CHECK_EQ_U64(report.new_sectors, PART_SECTORS);
    CHECK_EQ_U64(COW_CloneToFile(ov, out_path, VDD_TYPE_RAW, 0, NULL, NULL), COW_ERR_NONE);
    CHECK(COW_Close(ov) == NULL);
    snprintf(cmd, sizeof cmd,
             "set -e; export MTOOLS_SKIP_CHECK=1; "
             "dd if='%s' of='%s' bs=512 skip=%u count=%u status=none; "
             "test \"$(fsck.fat -n '%s' | wc -l)\" = 2; mcopy -i '%s' ::/FILE.BIN '%s'; "
             "cmp '%s' '%s'",
             out_path, part_path, PART_START, PART_SECTORS, part_path, part_path, back, back,
             file);
    CHECK(run(cmd));
    CHECK_EQ_U64(fsck_total(part_path), PART_SECTORS);

    /* A dirty volume: refused, the overlay's first sector unchanged. */
    ov = overlay_of(dirty_path);
    CHECK(ov != NULL);
    CHECK(COW_ReadSectors(ov, before, PART_START, 1) != VDDR_RSLT_FAIL);
    CHECK_EQ_U64(COW_GrowFilesystem((HCOW)ov, PART_START, PART_SECTORS, 0, NULL),
                 COW_ERR_UNSUPPORTED);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "dirty") != NULL);
    CHECK(COW_ReadSectors(ov, after, PART_START, 1) == VDDR_RSLT_NORMAL);
    CHECK(memcmp(before, after, 512) == 0);
    CHECK(COW_Close(ov) == NULL);

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(run(cmd));
    return tu_finish("fs_grow");
}
