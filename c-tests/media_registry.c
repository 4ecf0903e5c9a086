/* The rest of the legacy vddr.h from C: VDDR_QuickGetUUID (checked against
 * the UUID bytes read by hand from the image headers: a VDI's creation UUID
 * at 0x188, a VHD footer's unique id at 68, as VirtualBox holds them),
 * VDDR_OpenMediaRegistry with a .vbox file written here (a relative
 * location), VDDR_OpenByUUID,
 * the iChain index and the errors. Images come from the qemu-made fixture
 * (argv[1], as for formats_open). Deep chains across folders are tested in
 * tests/media_registry.rs. */
#include "testutil.h"
#include "vddr.h"

static int read_at(const char *path, long offset, unsigned char *out, size_t n)
{
    FILE *f = fopen(path, "rb");
    int ok = f && fseek(f, offset, SEEK_SET) == 0 && fread(out, 1, n, f) == n;
    if (f) fclose(f);
    return ok;
}

static void uuid_text(const S_UUID *u, char *out)
{
    sprintf(out, "{%08x-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x}", u->Gen.u32TimeLow,
            u->Gen.u16TimeMid, u->Gen.u16TimeHiAndVersion, u->Gen.u8ClockSeqHiAndReserved,
            u->Gen.u8ClockSeqLow, u->Gen.au8Node[0], u->Gen.au8Node[1], u->Gen.au8Node[2],
            u->Gen.au8Node[3], u->Gen.au8Node[4], u->Gen.au8Node[5]);
}

int main(int argc, char **argv)
{
    char vdi[512], vhd[512], qcow2[512], dir[] = "/tmp/cowdisk-mediareg-XXXXXX", vbox[600];
    char image[600], text[64], empty[600], cmd[1400];
    unsigned char raw[16];
    S_UUID u, v, zero;
    HVDDR h;
    long long bytes = 0;
    FILE *f;
    tu_fingerprint before;

    if (argc < 2) { fprintf(stderr, "usage: media_registry IMAGE_DIR\n"); return 2; }
    snprintf(vdi, sizeof vdi, "%s/disk.vdi", argv[1]);
    snprintf(vhd, sizeof vhd, "%s/disk.vhd", argv[1]);
    snprintf(qcow2, sizeof qcow2, "%s/disk.qcow2", argv[1]);
    before = tu_fingerprint_of(vdi);
    memset(&zero, 0, sizeof zero);

    /* QuickGetUUID against the header bytes. */
    CHECK(VDDR_QuickGetUUID(vdi, &u));
    CHECK(read_at(vdi, 0x188, raw, 16) && memcmp(raw, u.au8, 16) == 0);
    CHECK(VDDR_QuickGetUUID(vhd, &v));
    CHECK(read_at(vhd, 68, raw, 16) && memcmp(raw, v.au8, 16) == 0);
    memset(&v, 0xAB, sizeof v);
    CHECK(!VDDR_QuickGetUUID(qcow2, &v)); /* qcow2 has no UUID */
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_UNSUPPORTED);
    CHECK(memcmp(&v, &zero, sizeof v) == 0);
    CHECK(!VDDR_QuickGetUUID("/nonexistent/cowdisk.vdi", &v));
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);

    /* The opened disk reports the same UUID. */
    h = VDDR_Open(vdi, 0);
    CHECK(h != NULL);
    if (h) {
        CHECK(h->GetDriveUUID(h, &v) && memcmp(&u, &v, sizeof u) == 0);
        CHECK(h->GetDriveSize(h, &bytes) && bytes > 0);
        h = h->Close(h);
    }

    /* A machine folder with a .vbox naming the VDI by absolute path; the
     * global registry is pointed at an empty folder. */
    CHECK(mkdtemp(dir) != NULL);
    snprintf(empty, sizeof empty, "%s/home", dir);
    CHECK(mkdir(empty, 0700) == 0);
    setenv("VBOX_USER_HOME", empty, 1);
    /* A copy (the registry is looked for beside the image's real path). */
    snprintf(image, sizeof image, "%s/machine.vdi", dir);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", vdi, image);
    CHECK(system(cmd) == 0);
    /* No registry yet: a clear failure naming where it looked. */
    CHECK(!VDDR_OpenMediaRegistry(image));
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);
    CHECK(VDDR_OpenByUUID(&u, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);

    uuid_text(&u, text);
    snprintf(vbox, sizeof vbox, "%s/machine.vbox", dir);
    f = fopen(vbox, "w");
    CHECK(f != NULL);
    if (f) {
        fprintf(f,
                "<?xml version=\"1.0\"?>\n<VirtualBox version=\"1.19-linux\">\n"
                "  <Machine uuid=\"{00000000-0000-0000-0000-000000000001}\" name=\"m\">\n"
                "    <MediaRegistry>\n      <HardDisks>\n"
                "        <HardDisk uuid=\"%s\" location=\"%s\" format=\"VDI\" type=\"Normal\"/>\n"
                "      </HardDisks>\n    </MediaRegistry>\n  </Machine>\n</VirtualBox>\n",
                text, "machine.vdi"); /* relative to the .vbox's folder */
        fclose(f);
    }
    CHECK(VDDR_OpenMediaRegistry(image));
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    h = VDDR_OpenByUUID(&u, 0);
    CHECK(h != NULL);
    if (h) {
        long long size2 = 0;
        CHECK(h->GetDriveSize(h, &size2) && size2 == bytes);
        CHECK(h->GetDriveUUID(h, &v) && memcmp(&u, &v, sizeof u) == 0);
        h = h->Close(h);
    }
    /* An unknown UUID, a NULL one. */
    v = u;
    v.au8[15] ^= 0xFF;
    CHECK(VDDR_OpenByUUID(&v, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_OPEN);
    CHECK(VDDR_OpenByUUID(NULL, 0) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);

    /* iChain: the disk's index in a chain; 32 and above is refused. */
    h = VDDR_Open(vdi, 3);
    CHECK(h != NULL);
    if (h) h = h->Close(h);
    CHECK(VDDR_Open(vdi, 32) == NULL);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVALID_ARG);
    h = VDDR_OpenByUUID(&u, 31);
    CHECK(h != NULL);
    if (h) h = h->Close(h);

    /* A malformed registry: a clear error naming the file; nothing kept. */
    f = fopen(vbox, "w");
    if (f) { fputs("<VirtualBox><MediaRegistry><HardDisks><HardDisk uuid=", f); fclose(f); }
    CHECK(!VDDR_OpenMediaRegistry(image));
    CHECK(COW_GetLastError() != COW_ERR_NONE);
    CHECK(strstr(COW_GetErrorString(COW_LAST_ERROR), "machine.vbox") != NULL);

    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(vdi)));
    return tu_finish("media_registry");
}
