#include "crc32c.h"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace bm {

namespace {

struct Table {
  uint32_t entries[256];
  Table() {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t crc = i;
      for (int bit = 0; bit < 8; bit++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
      entries[i] = crc;
    }
  }
};

uint32_t Crc32cPortable(const uint8_t* data, size_t length, uint32_t crc) {
  static const Table table;
  for (size_t i = 0; i < length; i++) crc = (crc >> 8) ^ table.entries[(crc ^ data[i]) & 0xFF];
  return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(const uint8_t* data, size_t length, uint32_t crc) {
  uint64_t crc64 = crc;
  while (length >= 8) {
    uint64_t word;
    memcpy(&word, data, 8);
    crc64 = _mm_crc32_u64(crc64, word);
    data += 8;
    length -= 8;
  }
  uint32_t crc32 = static_cast<uint32_t>(crc64);
  while (length > 0) {
    crc32 = _mm_crc32_u8(crc32, *data++);
    length--;
  }
  return crc32;
}
#endif

}  // namespace

uint32_t Crc32c(const uint8_t* data, size_t length, uint32_t crc) {
  crc = ~crc;
#if defined(__x86_64__)
  static const bool hasSse42 = __builtin_cpu_supports("sse4.2");
  crc = hasSse42 ? Crc32cHardware(data, length, crc) : Crc32cPortable(data, length, crc);
#else
  crc = Crc32cPortable(data, length, crc);
#endif
  return ~crc;
}

}  // namespace bm
