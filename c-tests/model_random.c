/* Random sequences of calls through the C API - the legacy method table
 * and the COW_* functions - against a naive model kept here: a byte array
 * of the whole drive and a status per sector, edited with memmove. Every
 * call's return value is checked exactly (COW_ERR_* codes for edits,
 * VDDR_RSLT_* for reads, writes and BlockStatus), and every read's bytes
 * and status, to the sector: a sector is data only if it was written or is
 * data in the source. Positions are biased to the edges (0, the end, just
 * past it) and the granularity varies, so writes land next to inserted
 * space, inside partly written units, across moved ranges. */
#include "testutil.h"
#include "cowdisk.h"

#define MAX_SECTORS 6000u
#define SRC_SECTORS 1500u

/* The source: a caller's object with the legacy member types. */
typedef struct {
    VDDR vddr;
    unsigned char data[SRC_SECTORS * 512];
    unsigned char status[SRC_SECTORS];
} Source;

static unsigned int src_size(HVDDR h, long long *bytes) { (void)h; *bytes = SRC_SECTORS * 512; return 1; }
static unsigned int combine(unsigned int a, unsigned int b)
{
    if (a == VDDR_RSLT_NORMAL || b == VDDR_RSLT_NORMAL) return VDDR_RSLT_NORMAL;
    if (a == VDDR_RSLT_BLANKPAGE || b == VDDR_RSLT_BLANKPAGE) return VDDR_RSLT_BLANKPAGE;
    return VDDR_RSLT_NOTALLOC;
}
static unsigned int src_status(HVDDR h, long long first, long long last)
{
    Source *s = (Source *)h;
    unsigned int st = VDDR_RSLT_NOTALLOC;
    long long i;
    for (i = first; i <= last; i++) st = combine(st, s->status[i]);
    return st;
}
static int src_read(HVDDR h, void *buf, long long lba, unsigned int n)
{
    Source *s = (Source *)h;
    if (lba < 0 || lba + n > SRC_SECTORS) return VDDR_RSLT_FAIL;
    memcpy(buf, s->data + lba * 512, (size_t)n * 512);
    return (int)src_status(h, lba, lba + (long long)n - 1);
}

static Source src;
static unsigned char model[MAX_SECTORS * 512], model_status[MAX_SECTORS];
static uint64_t size;
static unsigned char buf[MAX_SECTORS * 512], page[(1u << 9) * 512];

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
/* A position in 0..size, biased to the edges, sometimes past the end. */
static uint64_t pos(void)
{
    switch (rnd() % 10) {
    case 0: return 0;
    case 1: return size;
    case 2: return size ? size - 1 : 0;
    case 3: return size + 1 + rnd() % 3;
    default: return rnd() % (size + 1);
    }
}
static uint64_t len(uint64_t start)
{
    uint64_t room = size > start ? size - start : 0;
    switch (rnd() % 8) {
    case 0: return 0;
    case 1: return room;
    case 2: return room + 1;
    default: return rnd() % 300;
    }
}
static int inside(uint64_t lba, uint64_t n) { return lba <= size && n <= size - lba; }

static unsigned int model_status_of(uint64_t lba, uint64_t n)
{
    unsigned int st = VDDR_RSLT_NOTALLOC;
    uint64_t i;
    for (i = lba; i < lba + n; i++) st = combine(st, model_status[i]);
    return st;
}

static void run(uint64_t seed, unsigned int granularity, int ops)
{
    COW_OPTIONS opt;
    HVDDR ov;
    HCOW cow;
    uint64_t i;
    int op;

    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;
    memset(&src, 0, sizeof src);
    src.vddr.GetDriveSize = src_size;
    src.vddr.BlockStatus = src_status;
    src.vddr.ReadSectors = src_read;
    for (i = 0; i < SRC_SECTORS;) {
        uint64_t run_len = 1 + rnd() % 40, k = rnd() % 8, j;
        unsigned char st = k < 5 ? VDDR_RSLT_NORMAL : k < 6 ? VDDR_RSLT_BLANKPAGE : VDDR_RSLT_NOTALLOC;
        for (j = 0; j < run_len && i < SRC_SECTORS; j++, i++) {
            src.status[i] = st;
            if (st == VDDR_RSLT_NORMAL) {
                unsigned int b;
                for (b = 0; b < 512; b++) src.data[i * 512 + b] = (unsigned char)((i * 7 + b) | 1);
            }
        }
    }
    memcpy(model, src.data, sizeof src.data);
    memcpy(model_status, src.status, SRC_SECTORS);
    size = SRC_SECTORS;

    CHECK_EQ_U64(COW_InitOptions(&opt), COW_ERR_NONE);
    opt.granularity = granularity;
    ov = COW_CreateCowOverlayEx((HVDDR)&src, &opt);
    CHECK(ov != NULL);
    if (!ov) return;
    cow = (HCOW)ov;

    for (op = 0; op < ops; op++) {
        uint64_t a = pos(), n = len(a), b;
        int rc, want;
        switch (rnd() % 9) {
        case 0: /* insert */
            n %= 200;
            if (size + n > MAX_SECTORS) n = 0;
            want = a <= size ? COW_ERR_NONE : COW_ERR_INVBLOCK;
            rc = (rnd() & 1) ? cow->InsertSectors(cow, (long long)a, (unsigned int)n)
                             : COW_InsertSectorsEx(cow, a, n);
            CHECK_EQ_U64(rc, want);
            if (want == COW_ERR_NONE && n) {
                memmove(model + (a + n) * 512, model + a * 512, (size - a) * 512);
                memset(model + a * 512, 0, n * 512);
                memmove(model_status + a + n, model_status + a, size - a);
                memset(model_status + a, VDDR_RSLT_NOTALLOC, n);
                size += n;
            }
            break;
        case 1: /* move */
            b = pos();
            if (!inside(a, n) || b > size) want = COW_ERR_INVBLOCK;
            else if (a <= b && b <= a + n) want = COW_ERR_INVALIDMOVE;
            else want = COW_ERR_NONE;
            rc = (rnd() & 1) && n <= 0xFFFFFFFFu
                     ? cow->MoveSectors(cow, (long long)a, (long long)b, (unsigned int)n)
                     : COW_MoveSectorsEx(cow, a, b, n);
            CHECK_EQ_U64(rc, want);
            if (want == COW_ERR_NONE && n) {
                uint64_t dest = b < a ? b : b - n;
                memcpy(buf, model + a * 512, n * 512);
                {
                    unsigned char *st = (unsigned char *)malloc(n);
                    memcpy(st, model_status + a, n);
                    memmove(model + a * 512, model + (a + n) * 512, (size - a - n) * 512);
                    memmove(model_status + a, model_status + a + n, size - a - n);
                    memmove(model + (dest + n) * 512, model + dest * 512, (size - n - dest) * 512);
                    memmove(model_status + dest + n, model_status + dest, size - n - dest);
                    memcpy(model + dest * 512, buf, n * 512);
                    memcpy(model_status + dest, st, n);
                    free(st);
                }
            }
            break;
        case 2: /* write */
        case 3:
            n %= 400;
            for (i = 0; i < n * 512; i++) buf[i] = (unsigned char)(rnd() | 1);
            want = inside(a, n) ? VDDR_RSLT_NORMAL : VDDR_RSLT_FAIL;
            rc = (rnd() & 1) ? cow->WriteSectors(cow, buf, (long long)a, (unsigned int)n)
                             : COW_WriteSectors(cow, buf, a, (uint32_t)n);
            CHECK_EQ_U64(rc, want);
            if (want == VDDR_RSLT_FAIL) CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
            if (want == VDDR_RSLT_NORMAL && n) {
                memcpy(model + a * 512, buf, n * 512);
                memset(model_status + a, VDDR_RSLT_NORMAL, n);
            }
            break;
        case 4: /* delete */
            want = inside(a, n) ? COW_ERR_NONE : COW_ERR_INVBLOCK;
            rc = (rnd() & 1) ? cow->DeleteSectors(cow, (long long)a, (long long)n)
                             : COW_DeleteSectors(cow, a, n);
            CHECK_EQ_U64(rc, want);
            if (want == COW_ERR_NONE && n) {
                memmove(model + a * 512, model + (a + n) * 512, (size - a - n) * 512);
                memmove(model_status + a, model_status + a + n, size - a - n);
                size -= n;
            }
            break;
        case 5: /* discard */
            want = inside(a, n) ? COW_ERR_NONE : COW_ERR_INVBLOCK;
            rc = (rnd() & 1) ? cow->DiscardSectors(cow, (long long)a, (long long)n)
                             : COW_DiscardSectors(cow, a, n);
            CHECK_EQ_U64(rc, want);
            if (want == COW_ERR_NONE && n) {
                memset(model + a * 512, 0, n * 512);
                memset(model_status + a, VDDR_RSLT_NOTALLOC, n);
            }
            break;
        case 6: /* read */
            n %= 600;
            if (n == 0) want = VDDR_RSLT_NORMAL;
            else if (!inside(a, n)) want = VDDR_RSLT_FAIL;
            else want = (int)model_status_of(a, n);
            rc = (rnd() & 1) ? ov->ReadSectors(ov, buf, (long long)a, (unsigned int)n)
                             : COW_ReadSectors(ov, buf, a, (uint32_t)n);
            CHECK_EQ_U64(rc, want);
            if (want != VDDR_RSLT_FAIL && n && memcmp(buf, model + a * 512, n * 512) != 0) {
                fprintf(stderr, "seed %llu op %d: bytes of %llu+%llu differ\n",
                        (unsigned long long)seed, op, (unsigned long long)a, (unsigned long long)n);
                tu_failures++;
            }
            break;
        case 7: { /* BlockStatus, inclusive, clipped; out of range is NOTALLOC */
            uint64_t last = a + n - (n ? 1 : 0) + (rnd() % 4 == 0 ? 1000 : 0);
            if (n == 0 && rnd() % 2) last = a ? a - 1 : 0; /* sometimes empty */
            if (a >= size || last < a) want = VDDR_RSLT_NOTALLOC;
            else want = (int)model_status_of(a, (last < size ? last : size - 1) - a + 1);
            rc = (int)ov->BlockStatus(ov, (long long)a, (long long)last);
            CHECK_EQ_U64(rc, want);
            break;
        }
        default: { /* ReadPage, 2^shift sectors */
            unsigned int shift = (unsigned int)(rnd() % 10), idx;
            uint64_t per = 1ull << shift, first, inner;
            idx = (unsigned int)(size ? rnd() % (size / per + 2) : 0);
            first = (uint64_t)idx * per;
            rc = ov->ReadPage(ov, page, idx, shift);
            if (first >= size) {
                CHECK_EQ_U64(rc, VDDR_RSLT_FAIL);
                CHECK_EQ_U64(COW_GetLastError(), COW_ERR_INVBLOCK);
                break;
            }
            inner = size - first < per ? size - first : per;
            CHECK_EQ_U64(rc, model_status_of(first, inner));
            if (memcmp(page, model + first * 512, inner * 512) != 0) {
                fprintf(stderr, "seed %llu op %d: page %u differs\n", (unsigned long long)seed, op, idx);
                tu_failures++;
            }
            for (i = inner * 512; i < per * 512; i++)
                if (page[i]) { CHECK(page[i] == 0); break; }
            break;
        }
        }
        if (tu_failures) {
            fprintf(stderr, "model_random: first failure at seed %llu, granularity %u, op %d\n",
                    (unsigned long long)seed, granularity, op);
            break;
        }
    }
    /* Finally every sector, one at a time. */
    for (i = 0; i < size && !tu_failures; i++) {
        CHECK_EQ_U64(ov->BlockStatus(ov, (long long)i, (long long)i), model_status[i]);
    }
    CHECK(ov->Close(ov) == NULL);
}

int main(void)
{
    static const unsigned int granularities[] = {8, 64, 2048};
    const char *env = getenv("COWDISK_MODEL_OPS");
    int ops = env ? atoi(env) : 2000;
    uint64_t seed;
    for (seed = 1; seed <= 12 && !tu_failures; seed++)
        run(seed, granularities[seed % 3], ops);
    return tu_finish("model_random");
}
