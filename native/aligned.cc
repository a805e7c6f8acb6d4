// allocAligned: posix_memalign memory handed to JS as an external ArrayBuffer, freed by its finalizer.
// Node's own Buffers are not sector-aligned, and O_DIRECT refuses unaligned memory with EINVAL.
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace bm {

static Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t sizeBytes = ArgU64(info, 0, "sizeBytes");
  uint64_t alignBytes = ArgU64(info, 1, "alignBytes");
  if (alignBytes < sizeof(void*) || (alignBytes & (alignBytes - 1)) != 0 || alignBytes > (1u << 21)) {
    throw Napi::RangeError::New(env, "alignBytes must be a power of two between 8 and 2 MiB");
  }
  if (sizeBytes > kMaxIoBytes) {
    throw Napi::RangeError::New(env, "sizeBytes must be at most 1 GiB");
  }
  // A zero-byte request still gets a distinct aligned block so the Buffer has a valid address.
  size_t allocBytes = sizeBytes == 0 ? alignBytes : sizeBytes;
  void* memory = nullptr;
  int rc = posix_memalign(&memory, alignBytes, allocBytes);
  if (rc != 0) throw MakeNativeError(env, SyscallError(rc, "posix_memalign", ""));
  memset(memory, 0, allocBytes);
  // External Buffer: the finalizer frees the block once V8 collects the last view of it.
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(memory), sizeBytes,
                                    [](Napi::Env, uint8_t* block) { free(block); });
}

void InitAligned(Napi::Env env, Napi::Object exports) {
  exports.Set("allocAligned", Napi::Function::New(env, AllocAligned, "allocAligned"));
}

}  // namespace bm
