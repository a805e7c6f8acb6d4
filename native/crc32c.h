#pragma once
#include <cstddef>
#include <cstdint>

namespace bm {
// CRC-32C (Castagnoli), as used by iSCSI/ext4; SSE4.2 instruction when the CPU has it.
uint32_t Crc32c(const uint8_t* data, size_t length, uint32_t crc = 0);
}  // namespace bm
