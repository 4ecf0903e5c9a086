/* Two threads read one overlay handle at once, into buffers from malloc
 * placed 0, 1, 16 and 512 bytes past the allocation (the placements the
 * library reads through a bounce buffer and the ones it reads directly),
 * while the main thread asks BlockStatus and the size. Every byte must be
 * the pattern's, computed here from its offset. */
#include "testutil.h"
#include <pthread.h>
#include "cowdisk.h"

#define IMAGE_MIB 8
#define PAGE_BYTES (1u << 20)

static unsigned char byte_at(uint64_t offset)
{
    return (unsigned char)((offset >> 9) * 37u + (offset & 511u) * 11u + 1u);
}

static HVDDR overlay;
static int wrong_bytes[2], failed_reads[2];

static void *reader(void *arg)
{
    int me = (int)(size_t)arg, round;
    static const size_t placements[] = {0, 1, 16, 512};
    unsigned int page, first = me ? IMAGE_MIB / 2 : 0;
    for (round = 0; round < 8; round++) {
        size_t past = placements[(size_t)(round + me) % 4];
        unsigned char *block = malloc(PAGE_BYTES + 1024);
        unsigned char *buf = block + past;
        if (!block) { failed_reads[me]++; return NULL; }
        for (page = first; page < first + IMAGE_MIB / 2; page++) {
            uint64_t base = (uint64_t)page * PAGE_BYTES, i;
            if (overlay->ReadPage(overlay, buf, page, 11) != VDDR_RSLT_NORMAL) {
                failed_reads[me]++;
                continue;
            }
            if (COW_GetLastError() != COW_ERR_NONE) failed_reads[me]++;
            for (i = 0; i < PAGE_BYTES; i++)
                if (buf[i] != byte_at(base + i)) wrong_bytes[me]++;
        }
        free(block);
    }
    return NULL;
}

int main(void)
{
    char path[64];
    size_t size = (size_t)IMAGE_MIB * PAGE_BYTES, i;
    unsigned char *data = malloc(size);
    pthread_t t[2];
    int n, statuses = 0;
    long long bytes = 0;
    CHECK(data != NULL);
    if (!data) return tu_finish("parallel_reads");
    for (i = 0; i < size; i++) data[i] = byte_at(i);
    CHECK(tu_write_temp(path, data, size));
    free(data);
    overlay = COW_CreateCowOverlay(VDDR_Open(path, 0));
    CHECK(overlay != NULL);
    if (!overlay) return tu_finish("parallel_reads");
    for (n = 0; n < 2; n++) pthread_create(&t[n], NULL, reader, (void *)(size_t)n);
    /* Meanwhile, metadata calls on the same handle from this thread. */
    for (n = 0; n < 2000; n++) {
        if (overlay->BlockStatus(overlay, (uint64_t)n * 7, (uint64_t)n * 7 + 63) == VDDR_RSLT_NORMAL)
            statuses++;
        if (overlay->GetDriveSize(overlay, &bytes) && bytes == (long long)size) statuses++;
    }
    for (n = 0; n < 2; n++) pthread_join(t[n], NULL);
    CHECK_EQ_U64(statuses, 4000);
    CHECK_EQ_U64(wrong_bytes[0], 0);
    CHECK_EQ_U64(wrong_bytes[1], 0);
    CHECK_EQ_U64(failed_reads[0], 0);
    CHECK_EQ_U64(failed_reads[1], 0);
    overlay->Close(overlay);
    CHECK_EQ_U64(COW_GetLastError(), COW_ERR_NONE);
    unlink(path);
    return tu_finish("parallel_reads");
}
