/* Two threads, each with its own overlay, interleaved so that one's call
 * fails while the other's succeeds: each thread sees its own last error. */
#include "testutil.h"
#include <pthread.h>
#include "cowdisk.h"

typedef struct { VDDR vddr; } Blank;
static unsigned int b_size(HVDDR h, long long *bytes) { (void)h; *bytes = 1024 * 512; return 1; }
static int b_read(HVDDR h, void *buf, long long lba, unsigned int n)
{
    (void)h; (void)lba;
    memset(buf, 0, (size_t)n * 512);
    return VDDR_RSLT_NOTALLOC;
}

static pthread_barrier_t step;
static int mismatches[2];

/* Each round: thread 0 makes a failing call while thread 1 makes a
 * succeeding one; after a barrier each checks its own last error; then
 * thread 1 fails while thread 0 waits, and thread 0 checks its error is
 * still its own. */
static void *worker(void *arg)
{
    int me = (int)(size_t)arg, round;
    Blank src;
    HVDDR ov;
    unsigned char buf[512];
    memset(&src, 0, sizeof src);
    src.vddr.GetDriveSize = b_size;
    src.vddr.ReadSectors = b_read;
    ov = COW_CreateCowOverlay((HVDDR)&src);
    for (round = 0; round < 200; round++) {
        if (me == 0) ov->ReadSectors(ov, buf, 5000, 1);
        else ov->ReadSectors(ov, buf, 5, 1);
        pthread_barrier_wait(&step);
        if (COW_GetLastError() != (me == 0 ? COW_ERR_INVBLOCK : COW_ERR_NONE)) mismatches[me]++;
        pthread_barrier_wait(&step);
        if (me == 1) ov->ReadSectors(ov, buf, 5000, 1);
        pthread_barrier_wait(&step);
        if (me == 0 && COW_GetLastError() != COW_ERR_INVBLOCK) mismatches[me]++;
        if (me == 1 && COW_GetLastError() != COW_ERR_INVBLOCK) mismatches[me]++;
        if (me == 1) ov->ReadSectors(ov, buf, 6, 1);
        pthread_barrier_wait(&step);
        if (me == 0 && COW_GetLastError() != COW_ERR_INVBLOCK) mismatches[me]++;
    }
    ov->Close(ov);
    return NULL;
}

int main(void)
{
    pthread_t t[2];
    int i;
    pthread_barrier_init(&step, NULL, 2);
    for (i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, (void *)(size_t)i);
    for (i = 0; i < 2; i++) pthread_join(t[i], NULL);
    pthread_barrier_destroy(&step);
    CHECK_EQ_U64(mismatches[0], 0);
    CHECK_EQ_U64(mismatches[1], 0);
    /* The main thread made no call: its last error is its own (none). */
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    return tu_finish("threads");
}
