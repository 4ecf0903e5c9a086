/* A real kill -9 of a process writing through the C API, at random moments,
 * COWDISK_KILL_ROUNDS times (default 200). Each round a child process opens
 * the persistent store (creating it in round 0), continues a numbered
 * sequence of writes - write i puts a sector stamped with i into slot
 * i % SLOTS - flushing every few writes and telling the parent, through a
 * pipe, the last write number a flush covered. The parent kills it with
 * SIGKILL after a random delay, reopens the store (which must succeed) and
 * checks that it holds exactly the writes 1..C for some C at least the last
 * flushed number: every slot stamped with the largest j <= C in it. */
#include "testutil.h"
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include "cow.h"

#define SLOTS 64u
#define SLOT_STRIDE 16u            /* sectors between slots */
#define SECTORS (SLOTS * SLOT_STRIDE)
#define FLUSH_EVERY 8u

static char src_path[64], store_path[96];

static void stamp(unsigned char *sector, uint64_t i)
{
    size_t k;
    for (k = 0; k < 512; k++) sector[k] = (unsigned char)(i * 31u + k * 7u + 1u);
    memcpy(sector, &i, sizeof i);
}

/* The write number in a slot (0 = never written), or -1 if the sector is
 * not a well-formed stamp. */
static int64_t read_slot(HVDDR ov, uint32_t slot)
{
    unsigned char got[512], want[512];
    uint64_t i;
    if (ov->ReadSectors(ov, got, (long long)slot * SLOT_STRIDE, 1) == VDDR_RSLT_FAIL) return -1;
    memcpy(&i, got, sizeof i);
    if (i == 0) {
        static const unsigned char zeros[512];
        return memcmp(got, zeros, 512) == 0 ? 0 : -1;
    }
    stamp(want, i);
    return memcmp(got, want, 512) == 0 && i % SLOTS == slot ? (int64_t)i : -1;
}

static HVDDR open_store(int create)
{
    HVDDR src = VDDR_Open(src_path, 0);
    HVDDR ov;
    if (!src) return NULL;
    if (create) {
        COW_OPTIONS opt;
        COW_InitOptions(&opt);
        opt.granularity = 8;
        opt.store_path = store_path;
        ov = COW_CreateCowOverlayEx(src, &opt);
    } else {
        ov = COW_OpenCowOverlay(store_path, src, 0);
    }
    if (!ov) {
        fprintf(stderr, "open: %s\n", COW_GetErrorString(COW_LAST_ERROR));
        COW_Close(src);
    }
    return ov;
}

static void child(int create, uint64_t next, int report_fd)
{
    HVDDR ov = open_store(create);
    unsigned char sector[512];
    uint64_t ready = 0;
    if (!ov) _exit(3);
    /* Tell the parent the store is open: the random kill delay starts now
     * (so a slow start, e.g. under valgrind, does not eat it). */
    if (write(report_fd, &ready, sizeof ready) != (ssize_t)sizeof ready) _exit(6);
    for (;; next++) {
        stamp(sector, next);
        if (((HCOW)ov)->WriteSectors((HCOW)ov, sector, (long long)((next % SLOTS) * SLOT_STRIDE), 1) !=
            VDDR_RSLT_NORMAL) _exit(4);
        if (next % FLUSH_EVERY == 0) {
            if (COW_Flush((HCOW)ov) != COW_ERR_NONE) _exit(5);
            if (write(report_fd, &next, sizeof next) != (ssize_t)sizeof next) _exit(6);
        }
    }
}

int main(void)
{
    static unsigned char zeros[SECTORS * 512];
    int rounds = getenv("COWDISK_KILL_ROUNDS") ? atoi(getenv("COWDISK_KILL_ROUNDS")) : 200;
    int round, verified = 0;
    uint64_t recovered = 0, rng = 0x2545F4914F6CDD1DULL ^ (uint64_t)getpid();
    tu_fingerprint before;

    CHECK(tu_write_temp(src_path, zeros, sizeof zeros));
    snprintf(store_path, sizeof store_path, "%s.cow", src_path);
    before = tu_fingerprint_of(src_path);

    for (round = 0; round < rounds && tu_failures == 0; round++) {
        int fds[2], status;
        pid_t pid;
        uint64_t flushed = 0, value;
        struct timespec delay;
        HVDDR ov;
        uint32_t slot;
        int64_t c = 0;

        CHECK(pipe(fds) == 0);
        pid = fork();
        if (pid == 0) {
            close(fds[0]);
            child(round == 0, recovered + 1, fds[1]);
        }
        close(fds[1]);
        /* Wait until the writer has the store open. */
        if (read(fds[0], &value, sizeof value) != (ssize_t)sizeof value) {
            waitpid(pid, &status, 0);
            fprintf(stderr, "round %d: the writer died before opening the store (status %d)\n", round, status);
            CHECK(0);
            break;
        }
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        delay.tv_sec = 0;
        delay.tv_nsec = (long)(rng % 40000000u);     /* 0..40 ms */
        nanosleep(&delay, NULL);
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)) {
            fprintf(stderr, "round %d: the writer exited by itself (status %d)\n", round, status);
            CHECK(0);
        }
        while (read(fds[0], &value, sizeof value) == (ssize_t)sizeof value) flushed = value;
        close(fds[0]);

        ov = open_store(0);
        CHECK(ov != NULL);
        if (!ov) break;
        for (slot = 0; slot < SLOTS; slot++) {
            int64_t v = read_slot(ov, slot);
            if (v < 0) { fprintf(stderr, "round %d: slot %u is torn\n", round, slot); CHECK(0); }
            if (v > c) c = v;
        }
        /* Writes 1..c, exactly: each slot holds the largest j <= c in it. */
        for (slot = 0; slot < SLOTS; slot++) {
            uint64_t want = (uint64_t)c >= slot ? (uint64_t)c - ((uint64_t)c - slot) % SLOTS : 0;
            if (slot == 0 && (uint64_t)c < SLOTS) want = 0;
            if ((uint64_t)read_slot(ov, slot) != want) {
                fprintf(stderr, "round %d: slot %u holds %lld, the prefix 1..%lld says %llu\n", round, slot,
                        (long long)read_slot(ov, slot), (long long)c, (unsigned long long)want);
                CHECK(0);
            }
        }
        if ((uint64_t)c < flushed) {
            fprintf(stderr, "round %d: write %llu was flushed but the store ends at %lld\n", round,
                    (unsigned long long)flushed, (long long)c);
            CHECK(0);
        }
        CHECK(ov->Close(ov) == NULL);
        recovered = (uint64_t)c;
        verified++;
    }
    CHECK(tu_same_fingerprint(before, tu_fingerprint_of(src_path)));
    printf("%d kill -9 rounds verified; %llu writes survived in the end\n", verified,
           (unsigned long long)recovered);
    unlink(src_path);
    unlink(store_path);
    return tu_finish("store_kill9");
}
