// DirtyBitmap: one bit per power-of-two region of a volume (FastResync). At 64 KiB regions a
// 1 TiB volume needs 16 Mi bits = 2 MiB. Words are uint64 and a running count keeps count() O(1).
#include <cstring>
#include <vector>

#include "common.h"
#include "crc32c.h"

namespace bm {

static const napi_type_tag kDirtyBitmapTag = {0x626d6469727479ULL, 0x5be1c0a7e94d2f31ULL};

constexpr uint32_t kBitmapMagic = 0x42444d42;  // "BMDB" little-endian
constexpr uint32_t kBitmapVersion = 1;
constexpr size_t kBitmapHeaderBytes = 32;
constexpr size_t kBitmapTrailerBytes = 4;
constexpr uint64_t kMinRegionBytes = 512;
constexpr uint64_t kMaxRegionBytes = uint64_t{1} << 40;
// Bounds the bitmap to 256 MiB of memory (a 1 PiB volume at 128 KiB regions).
constexpr uint64_t kMaxRegionCount = uint64_t{1} << 31;

static bool ValidGeometry(uint64_t sizeBytes, uint64_t regionBytes, std::string* why) {
  if (regionBytes < kMinRegionBytes || regionBytes > kMaxRegionBytes || (regionBytes & (regionBytes - 1)) != 0) {
    *why = "regionBytes must be a power of two between 512 bytes and 1 TiB";
    return false;
  }
  if (sizeBytes == 0 || sizeBytes > kMaxSafeInteger) {
    *why = "sizeBytes must be a positive safe integer";
    return false;
  }
  if ((sizeBytes + regionBytes - 1) / regionBytes > kMaxRegionCount) {
    *why = "too many regions (at most 2^31): use a larger regionBytes";
    return false;
  }
  return true;
}

static void PutU32(uint8_t* out, uint32_t value) {
  for (int i = 0; i < 4; i++) out[i] = static_cast<uint8_t>(value >> (8 * i));
}
static void PutU64(uint8_t* out, uint64_t value) {
  for (int i = 0; i < 8; i++) out[i] = static_cast<uint8_t>(value >> (8 * i));
}
static uint32_t GetU32(const uint8_t* in) {
  uint32_t value = 0;
  for (int i = 3; i >= 0; i--) value = (value << 8) | in[i];
  return value;
}
static uint64_t GetU64(const uint8_t* in) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; i--) value = (value << 8) | in[i];
  return value;
}

class DirtyBitmap : public Napi::ObjectWrap<DirtyBitmap> {
 public:
  static Napi::Function DefineClass(Napi::Env env) {
    return ObjectWrap<DirtyBitmap>::DefineClass(env, "DirtyBitmap",
                                                {
                                                    InstanceMethod<&DirtyBitmap::SetRange>("setRange"),
                                                    InstanceMethod<&DirtyBitmap::ClearRange>("clearRange"),
                                                    InstanceMethod<&DirtyBitmap::TestRange>("testRange"),
                                                    InstanceMethod<&DirtyBitmap::Count>("count"),
                                                    InstanceMethod<&DirtyBitmap::DirtyBytes>("dirtyBytes"),
                                                    InstanceMethod<&DirtyBitmap::Runs>("runs"),
                                                    InstanceMethod<&DirtyBitmap::Merge>("merge"),
                                                    InstanceMethod<&DirtyBitmap::SnapshotAndClear>("snapshotAndClear"),
                                                    InstanceMethod<&DirtyBitmap::Serialize>("serialize"),
                                                    InstanceMethod<&DirtyBitmap::MemoryBytes>("memoryBytes"),
                                                    StaticMethod<&DirtyBitmap::Deserialize>("deserialize"),
                                                });
  }

  // new DirtyBitmap(sizeBytes, regionBytes)
  explicit DirtyBitmap(const Napi::CallbackInfo& info) : ObjectWrap<DirtyBitmap>(info) {
    Napi::Env env = info.Env();
    sizeBytes_ = ArgU64(info, 0, "sizeBytes");
    regionBytes_ = ArgU64(info, 1, "regionBytes");
    std::string why;
    if (!ValidGeometry(sizeBytes_, regionBytes_, &why)) {
      throw MakeNativeError(env, ValidationError("BM_ERR_BITMAP_GEOMETRY", why));
    }
    regionShift_ = static_cast<unsigned>(__builtin_ctzll(regionBytes_));
    regionCount_ = (sizeBytes_ + regionBytes_ - 1) >> regionShift_;
    words_.assign((regionCount_ + 63) / 64, 0);
    // Up to 256 MiB that V8 cannot see: without this, discarded snapshots pile up until some
    // unrelated allocation triggers a collection.
    externalBytes_ = static_cast<int64_t>(words_.size() * sizeof(uint64_t));
    Napi::MemoryManagement::AdjustExternalMemory(env, externalBytes_);
    napi_type_tag_object(env, info.This(), &kDirtyBitmapTag);
  }

  void Finalize(Napi::Env env) override { Napi::MemoryManagement::AdjustExternalMemory(env, -externalBytes_); }

 private:
  // Region range [first, end) touched by a byte range; validated against sizeBytes.
  void TouchedRegions(Napi::Env env, uint64_t offsetBytes, uint64_t lengthBytes, uint64_t* first, uint64_t* end) {
    RequireRange(env, offsetBytes, lengthBytes);
    *first = offsetBytes >> regionShift_;
    *end = lengthBytes == 0 ? *first : ((offsetBytes + lengthBytes - 1) >> regionShift_) + 1;
  }

  void RequireRange(Napi::Env env, uint64_t offsetBytes, uint64_t lengthBytes) {
    if (offsetBytes > sizeBytes_ || lengthBytes > sizeBytes_ - offsetBytes) {
      ErrorInfo error = ValidationError("BM_ERR_OUT_OF_RANGE", "range @" + std::to_string(offsetBytes) + "+" +
                                                                   std::to_string(lengthBytes) + " is outside the bitmap (" +
                                                                   std::to_string(sizeBytes_) + " bytes)");
      error.hasRange = true;
      error.offsetBytes = offsetBytes;
      error.lengthBytes = lengthBytes;
      throw MakeNativeError(env, error);
    }
  }

  static uint64_t MaskFrom(uint64_t bit) { return bit >= 64 ? 0 : ~uint64_t{0} << bit; }

  // Applies set (or clear) to bits [first, end) and returns how many bits changed.
  uint64_t Apply(uint64_t first, uint64_t end, bool set) {
    uint64_t changed = 0;
    while (first < end) {
      uint64_t wordIndex = first >> 6;
      uint64_t lowBit = first & 63;
      uint64_t highBit = end - (wordIndex << 6);  // exclusive, may exceed 64
      uint64_t mask = MaskFrom(lowBit) & ~MaskFrom(highBit);
      uint64_t& word = words_[wordIndex];
      uint64_t before = word;
      word = set ? (word | mask) : (word & ~mask);
      changed += static_cast<uint64_t>(__builtin_popcountll(before ^ word));
      first = (wordIndex + 1) << 6;
    }
    if (set) {
      count_ += changed;
    } else {
      count_ -= changed;
    }
    return changed;
  }

  bool AnySet(uint64_t first, uint64_t end) const {
    while (first < end) {
      uint64_t wordIndex = first >> 6;
      uint64_t mask = MaskFrom(first & 63) & ~MaskFrom(end - (wordIndex << 6));
      if ((words_[wordIndex] & mask) != 0) return true;
      first = (wordIndex + 1) << 6;
    }
    return false;
  }

  // First region >= from whose bit equals value, or regionCount_.
  uint64_t Find(uint64_t from, bool value) const {
    while (from < regionCount_) {
      uint64_t wordIndex = from >> 6;
      uint64_t word = value ? words_[wordIndex] : ~words_[wordIndex];
      word &= MaskFrom(from & 63);
      if (word != 0) {
        uint64_t found = (wordIndex << 6) + static_cast<uint64_t>(__builtin_ctzll(word));
        return found < regionCount_ ? found : regionCount_;
      }
      from = (wordIndex + 1) << 6;
    }
    return regionCount_;
  }

  Napi::Value SetRange(const Napi::CallbackInfo& info) {
    uint64_t first, end;
    TouchedRegions(info.Env(), ArgU64(info, 0, "offsetBytes"), ArgU64(info, 1, "lengthBytes"), &first, &end);
    return Napi::Number::New(info.Env(), static_cast<double>(Apply(first, end, true)));
  }

  Napi::Value ClearRange(const Napi::CallbackInfo& info) {
    uint64_t offsetBytes = ArgU64(info, 0, "offsetBytes");
    uint64_t lengthBytes = ArgU64(info, 1, "lengthBytes");
    RequireRange(info.Env(), offsetBytes, lengthBytes);
    // Only regions fully inside the range: a partly covered region may still hold dirty bytes.
    // The last region is shorter than regionBytes when sizeBytes is not a multiple; reaching
    // sizeBytes covers it fully.
    uint64_t first = (offsetBytes + regionBytes_ - 1) >> regionShift_;
    uint64_t endBytes = offsetBytes + lengthBytes;
    uint64_t end = endBytes == sizeBytes_ ? regionCount_ : endBytes >> regionShift_;
    if (first < end) Apply(first, end, false);
    return info.Env().Undefined();
  }

  Napi::Value TestRange(const Napi::CallbackInfo& info) {
    uint64_t first, end;
    TouchedRegions(info.Env(), ArgU64(info, 0, "offsetBytes"), ArgU64(info, 1, "lengthBytes"), &first, &end);
    return Napi::Boolean::New(info.Env(), AnySet(first, end));
  }

  Napi::Value Count(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(count_));
  }

  // count * regionBytes, with the (possibly shorter) last region counted at its real length.
  Napi::Value DirtyBytes(const Napi::CallbackInfo& info) {
    uint64_t bytes = count_ << regionShift_;
    uint64_t last = regionCount_ - 1;
    if ((words_[last >> 6] >> (last & 63)) & 1) bytes -= (regionCount_ << regionShift_) - sizeBytes_;
    return Napi::Number::New(info.Env(), static_cast<double>(bytes));
  }

  Napi::Value MemoryBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(words_.capacity() * sizeof(uint64_t) + sizeof(*this)));
  }

  // runs(startOffsetBytes, maxRuns): coalesced dirty runs starting at the region holding start.
  Napi::Value Runs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t startOffsetBytes = ArgU64(info, 0, "startOffsetBytes");
    uint64_t maxRuns = ArgU64(info, 1, "maxRuns");
    if (startOffsetBytes > sizeBytes_) RequireRange(env, startOffsetBytes, 0);
    Napi::Array runs = Napi::Array::New(env);
    uint32_t runCount = 0;
    uint64_t region = startOffsetBytes >> regionShift_;
    if (startOffsetBytes == sizeBytes_) region = regionCount_;  // no bytes at or after the end
    while (runCount < maxRuns) {
      uint64_t runStart = Find(region, true);
      if (runStart >= regionCount_) break;
      uint64_t runEnd = Find(runStart, false);
      uint64_t offsetBytes = runStart << regionShift_;
      uint64_t endBytes = runEnd << regionShift_;
      if (endBytes > sizeBytes_) endBytes = sizeBytes_;
      Napi::Object run = Napi::Object::New(env);
      run.Set("offsetBytes", static_cast<double>(offsetBytes));
      run.Set("lengthBytes", static_cast<double>(endBytes - offsetBytes));
      runs.Set(runCount++, run);
      region = runEnd;
    }
    return runs;
  }

  static DirtyBitmap* UnwrapTagged(Napi::Env env, Napi::Value value) {
    bool tagged = false;
    if (value.IsObject()) napi_check_object_type_tag(env, value, &kDirtyBitmapTag, &tagged);
    if (!tagged) throw Napi::TypeError::New(env, "expected a native DirtyBitmap");
    return Unwrap(value.As<Napi::Object>());
  }

  Napi::Value Merge(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    DirtyBitmap* other = UnwrapTagged(env, info[0]);
    if (other->sizeBytes_ != sizeBytes_ || other->regionBytes_ != regionBytes_) {
      throw MakeNativeError(env, ValidationError("BM_ERR_BITMAP_GEOMETRY",
                                                 "cannot merge bitmaps of different geometry (" +
                                                     std::to_string(sizeBytes_) + "/" + std::to_string(regionBytes_) +
                                                     " vs " + std::to_string(other->sizeBytes_) + "/" +
                                                     std::to_string(other->regionBytes_) + ")"));
    }
    uint64_t count = 0;
    for (size_t i = 0; i < words_.size(); i++) {
      words_[i] |= other->words_[i];
      count += static_cast<uint64_t>(__builtin_popcountll(words_[i]));
    }
    count_ = count;
    return env.Undefined();
  }

  Napi::Object NewEmptyLike(Napi::Env env) {
    Napi::Function ctor = GetAddonData(env).dirtyBitmapClass.Value();
    return ctor.New({Napi::Number::New(env, static_cast<double>(sizeBytes_)),
                     Napi::Number::New(env, static_cast<double>(regionBytes_))});
  }

  Napi::Value SnapshotAndClear(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object snapshotObject = NewEmptyLike(env);
    DirtyBitmap* snapshot = Unwrap(snapshotObject);
    // The fresh bitmap is all zeroes: swapping hands over the bits and clears this one at once.
    snapshot->words_.swap(words_);
    snapshot->count_ = count_;
    count_ = 0;
    return snapshotObject;
  }

  Napi::Value Serialize(const Napi::CallbackInfo& info) {
    size_t totalBytes = kBitmapHeaderBytes + words_.size() * 8 + kBitmapTrailerBytes;
    Napi::Buffer<uint8_t> buffer = Napi::Buffer<uint8_t>::New(info.Env(), totalBytes);
    uint8_t* out = buffer.Data();
    memset(out, 0, kBitmapHeaderBytes);
    PutU32(out, kBitmapMagic);
    PutU32(out + 4, kBitmapVersion);
    PutU64(out + 8, sizeBytes_);
    PutU64(out + 16, regionBytes_);
    PutU64(out + 24, words_.size());
    for (size_t i = 0; i < words_.size(); i++) PutU64(out + kBitmapHeaderBytes + i * 8, words_[i]);
    size_t bodyBytes = totalBytes - kBitmapTrailerBytes;
    PutU32(out + bodyBytes, Crc32c(out, bodyBytes));
    return buffer;
  }

  static Napi::Value Deserialize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 0, "buffer");
    const uint8_t* in = buffer.Data();
    size_t length = buffer.Length();
    auto corrupt = [&](const std::string& why) {
      return MakeNativeError(env, ValidationError("BM_ERR_BITMAP_CORRUPT", "dirty bitmap is corrupt: " + why));
    };
    if (length < kBitmapHeaderBytes + kBitmapTrailerBytes) throw corrupt("too short");
    if (GetU32(in) != kBitmapMagic) throw corrupt("bad magic");
    if (GetU32(in + 4) != kBitmapVersion) throw corrupt("unsupported version " + std::to_string(GetU32(in + 4)));
    uint64_t sizeBytes = GetU64(in + 8);
    uint64_t regionBytes = GetU64(in + 16);
    uint64_t wordCount = GetU64(in + 24);
    std::string why;
    if (!ValidGeometry(sizeBytes, regionBytes, &why)) throw corrupt(why);
    uint64_t regionCount = (sizeBytes + regionBytes - 1) / regionBytes;
    if (wordCount != (regionCount + 63) / 64) throw corrupt("word count does not match the geometry");
    if (length != kBitmapHeaderBytes + wordCount * 8 + kBitmapTrailerBytes) throw corrupt("wrong length");
    size_t bodyBytes = length - kBitmapTrailerBytes;
    if (Crc32c(in, bodyBytes) != GetU32(in + bodyBytes)) throw corrupt("checksum mismatch");

    Napi::Function ctor = GetAddonData(env).dirtyBitmapClass.Value();
    Napi::Object object = ctor.New({Napi::Number::New(env, static_cast<double>(sizeBytes)),
                                    Napi::Number::New(env, static_cast<double>(regionBytes))});
    DirtyBitmap* bitmap = Unwrap(object);
    uint64_t count = 0;
    for (size_t i = 0; i < wordCount; i++) {
      bitmap->words_[i] = GetU64(in + kBitmapHeaderBytes + i * 8);
      count += static_cast<uint64_t>(__builtin_popcountll(bitmap->words_[i]));
    }
    uint64_t tailBits = regionCount & 63;
    if (tailBits != 0 && (bitmap->words_[wordCount - 1] & MaskFrom(tailBits)) != 0) {
      throw corrupt("bits set past the last region");
    }
    bitmap->count_ = count;
    return object;
  }

  uint64_t sizeBytes_ = 0;
  uint64_t regionBytes_ = 0;
  unsigned regionShift_ = 0;
  uint64_t regionCount_ = 0;
  uint64_t count_ = 0;
  std::vector<uint64_t> words_;
  int64_t externalBytes_ = 0;  // reported to V8 (the words never change size)
};

void InitDirtyBitmap(Napi::Env env, Napi::Object exports) {
  Napi::Function bitmapClass = DirtyBitmap::DefineClass(env);
  GetAddonData(env).dirtyBitmapClass = Napi::Persistent(bitmapClass);
  exports.Set("DirtyBitmap", bitmapClass);
}

}  // namespace bm
