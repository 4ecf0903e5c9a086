/* COW_CloneToFile and COW_CloneToFileEx from C into every format this
 * library writes, each judged by qemu-img: `qemu-img compare` finds the
 * image identical to a raw clone of the same overlay, and for qcow2
 * `qemu-img check` finds no errors or leaks. A qcow2 delta over the source
 * reads (through its backing file) as the overlay; options a format does
 * not take are refused. */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include "cowdisk.h"

#define SECTORS (6u * 2048u + 3u) /* 6 MiB and 3 sectors */

typedef struct {
    const char *name;
    uint32_t format;
    uint32_t flags;
    const char *qemu_format;
} target;

/* Runs a shell command quietly; 1 when it exits 0. */
static int run(const char *command)
{
    char quiet[1024];
    snprintf(quiet, sizeof quiet, "%s >/dev/null 2>&1", command);
    return system(quiet) == 0;
}

static int qemu_compare(const char *reference, const char *image, const char *format)
{
    char command[768];
    snprintf(command, sizeof command, "qemu-img compare -f raw -F %s '%s' '%s'", format,
             reference, image);
    return run(command);
}

static int qemu_check_qcow2(const char *image)
{
    char command[512];
    snprintf(command, sizeof command, "qemu-img check -f qcow2 '%s'", image);
    return run(command);
}

int main(void)
{
    static const target targets[] = {
        {"raw", VDD_TYPE_RAW, 0, "raw"},
        {"vdi", VDD_TYPE_VDI, 0, "vdi"},
        {"qcow2", VDD_TYPE_QCOW2, 0, "qcow2"},
        {"qcow2c", VDD_TYPE_QCOW2, COW_CLONE_COMPRESS, "qcow2"},
        {"vhd", VDD_TYPE_VHD, 0, "vpc"},
        {"vhdfixed", VDD_TYPE_VHD, COW_CLONE_VHD_FIXED, "vpc"},
        {"vhdx", VDD_TYPE_VHDX, 0, "vhdx"},
        {"vmdk", VDD_TYPE_VMDK, 0, "vmdk"},
        {"vmdkstream", VDD_TYPE_VMDK, COW_CLONE_VMDK_STREAM, "vmdk"},
    };
    char src[64], dir[64], reference[128], out[128], base_name[64];
    const char *tmp = getenv("TMPDIR");
    unsigned char *data = (unsigned char *)malloc((size_t)SECTORS * 512);
    unsigned char sector[512];
    COW_CLONE_OPTIONS options;
    HVDDR disk, ov;
    size_t i;

    /* A source with data in its first 2 MiB and zeros after. */
    memset(data, 0, (size_t)SECTORS * 512);
    for (i = 0; i < (size_t)2 * 1024 * 1024; i++) data[i] = (unsigned char)(i * 13 + i / 512) | 1;
    CHECK(tu_write_temp(src, data, (size_t)SECTORS * 512));
    snprintf(dir, sizeof dir, "%s/cowdisk-clonefmt-XXXXXX", tmp ? tmp : "/tmp");
    CHECK(mkdtemp(dir) != NULL);

    disk = VDDR_Open(src, 0);
    CHECK(disk != NULL);
    ov = COW_CreateCowOverlay(disk);
    CHECK(ov != NULL);
    memset(sector, 0xEE, sizeof sector);
    CHECK_EQ_U64(COW_WriteSectors((HCOW)ov, sector, 5000, 1), VDDR_RSLT_NORMAL);
    CHECK_EQ_U64(COW_WriteSectors((HCOW)ov, sector, SECTORS - 1, 1), VDDR_RSLT_NORMAL);

    snprintf(reference, sizeof reference, "%s/reference.raw", dir);
    CHECK_EQ_U64(COW_CloneToFile(ov, reference, VDD_TYPE_RAW, 0, NULL, NULL), COW_ERR_NONE);

    for (i = 0; i < sizeof targets / sizeof targets[0]; i++) {
        snprintf(out, sizeof out, "%s/clone-%s", dir, targets[i].name);
        CHECK_EQ_U64(COW_CloneToFile(ov, out, targets[i].format, targets[i].flags, NULL, NULL),
                     COW_ERR_NONE);
        CHECK(qemu_compare(reference, out, targets[i].qemu_format));
        if (targets[i].format == VDD_TYPE_QCOW2) CHECK(qemu_check_qcow2(out));
        unlink(out);
    }

    /* COW_CloneToFileEx: qcow2 with 4 KiB clusters. */
    CHECK_EQ_U64(COW_InitCloneOptions(&options), COW_ERR_NONE);
    CHECK_EQ_U64(options.struct_size, sizeof options);
    CHECK_EQ_U64(options.format, VDD_TYPE_RAW);
    options.format = VDD_TYPE_QCOW2;
    options.cluster_size = 4096;
    snprintf(out, sizeof out, "%s/small-clusters.qcow2", dir);
    CHECK_EQ_U64(COW_CloneToFileEx(ov, out, &options, NULL, NULL), COW_ERR_NONE);
    CHECK(qemu_compare(reference, out, "qcow2"));
    CHECK(qemu_check_qcow2(out));
    unlink(out);

    /* A delta over the source (a relative backing name: the source's file
     * name, resolved from the image's folder, so the image goes next to
     * the source). */
    {
        const char *slash = strrchr(src, '/');
        char delta[128], command[512];
        snprintf(base_name, sizeof base_name, "%s", slash ? slash + 1 : src);
        snprintf(delta, sizeof delta, "%s.delta.qcow2", src);
        options.cluster_size = 0;
        options.backing_file = base_name;
        options.backing_format = "raw";
        CHECK_EQ_U64(COW_CloneToFileEx(ov, delta, &options, NULL, NULL), COW_ERR_NONE);
        CHECK(qemu_check_qcow2(delta));
        CHECK(qemu_compare(reference, delta, "qcow2"));
        /* Only the two changed clusters are stored. */
        snprintf(command, sizeof command,
                 "qemu-img check --output=json '%s' | grep -q '\"allocated-clusters\": 2,'", delta);
        CHECK(run(command));
        unlink(delta);

        /* A delta needs an overlay. */
        CHECK_EQ_U64(COW_CloneToFileEx(disk = VDDR_Open(src, 0), delta, &options, NULL, NULL),
                     COW_ERR_NOT_OVERLAY);
        CHECK(access(delta, F_OK) != 0);
        disk = COW_Close(disk);
        CHECK(disk == NULL);
    }

    /* Options a format does not take, and a short struct_size. */
    snprintf(out, sizeof out, "%s/refused", dir);
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_RAW, COW_CLONE_COMPRESS, NULL, NULL),
                 COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_CloneToFile(ov, out, VDD_TYPE_QCOW2, COW_CLONE_VHD_FIXED, NULL, NULL),
                 COW_ERR_INVALID_ARG);
    CHECK_EQ_U64(COW_InitCloneOptions(&options), COW_ERR_NONE);
    options.format = VDD_TYPE_VDI;
    options.cluster_size = 4096;
    CHECK_EQ_U64(COW_CloneToFileEx(ov, out, &options, NULL, NULL), COW_ERR_INVALID_ARG);
    options.format = VDD_TYPE_QCOW2;
    options.cluster_size = 3000;
    CHECK_EQ_U64(COW_CloneToFileEx(ov, out, &options, NULL, NULL), COW_ERR_INVALID_ARG);
    options.cluster_size = 0;
    options.struct_size = 4;
    CHECK_EQ_U64(COW_CloneToFileEx(ov, out, &options, NULL, NULL), COW_ERR_INVALID_ARG);
    CHECK(access(out, F_OK) != 0);
    CHECK_EQ_U64(COW_InitCloneOptions(NULL), COW_ERR_INVALID_ARG);

    ov = COW_Close(ov);
    CHECK(ov == NULL);
    unlink(reference);
    rmdir(dir);
    unlink(src);
    free(data);
    return tu_finish("clone_formats");
}
