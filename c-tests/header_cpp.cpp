// The headers compiled as C++11 with -Wall -Wextra -Wpedantic -Werror, the
// legacy names included twice (guards), and the API called from C++.
#include "cow.h"
#include "vddr.h"
#include "cowdisk.h"

#include <cstdio>
#include <cstring>

namespace {
struct Zero {
    VDDR vddr;
};
// The legacy member types: BOOL/UINT are unsigned int, HUGE is long long.
unsigned int zero_size(HVDDR, long long *bytes) { *bytes = 8 * 512; return 1; }
int zero_read(HVDDR, void *buf, long long, unsigned int n)
{
    std::memset(buf, 0, static_cast<size_t>(n) * 512);
    return VDDR_RSLT_NOTALLOC;
}
}  // namespace

int main()
{
    Zero z;
    std::memset(&z, 0, sizeof z);
    z.vddr.GetDriveSize = zero_size;
    z.vddr.ReadSectors = zero_read;
    HVDDR ov = COW_CreateCowOverlay(reinterpret_cast<HVDDR>(&z));
    if (ov == nullptr) return 1;
    HCOW cow = reinterpret_cast<HCOW>(ov);
    if (cow->InsertSectors(cow, 0, 8) != COW_ERR_NONE) return 2;
    long long bytes = 0;
    if (!ov->GetDriveSize(ov, &bytes) || bytes != 16 * 512) return 3;
    uint64_t bytes64 = 0;
    if (!COW_GetDriveSize(ov, &bytes64) || bytes64 != 16 * 512) return 6;
    char *text = COW_GetErrorString(COW_ERR_READ);
    if (std::strcmp(text, "read failed") != 0) return 4;
    ov = ov->Close(ov);
    std::printf("header_cpp: all checks passed\n");
    return ov == nullptr ? 0 : 5;
}
