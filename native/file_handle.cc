// The native side of BlockFile: open with explicit flags, geometry, and the data-path methods.
// Every method re-checks its arguments (the TS layer checks first, with the same codes).
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "io_engine.h"

namespace bm {

static const napi_type_tag kFileHandleTag = {0x626d66696c650001ULL, 0x9a3c5e7d21b04f18ULL};

// Upper bound on extents returned by one allocationMap call; the tail beyond it is reported as data
// (always a correct answer for base:allocation, just less precise).
constexpr size_t kMaxAllocationExtents = 65536;
constexpr size_t kZeroChunkBytes = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Thread-pool helpers shared by both engines (rare ops: discard, zeroes, allocation map).

class DiscardWorker : public FileWorker {
 public:
  DiscardWorker(Napi::Env env, std::shared_ptr<FileState> file, uint64_t offsetBytes, uint64_t lengthBytes)
      : FileWorker(env, std::move(file)), fd_(file_->fd), offsetBytes_(offsetBytes), lengthBytes_(lengthBytes) {}

 private:
  void Run() override {
    if (lengthBytes_ == 0) return;
    if (file_->isBlockDevice) {
      uint64_t range[2] = {offsetBytes_, lengthBytes_};
      if (ioctl(fd_, BLKDISCARD, range) < 0) Fail(SyscallError(errno, "ioctl(BLKDISCARD)", file_->path, offsetBytes_, lengthBytes_));
      return;
    }
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offsetBytes_),
                  static_cast<off_t>(lengthBytes_)) < 0) {
      Fail(SyscallError(errno, "fallocate(PUNCH_HOLE)", file_->path, offsetBytes_, lengthBytes_));
    }
  }
  int fd_;
  uint64_t offsetBytes_;
  uint64_t lengthBytes_;
};

class WriteZeroesWorker : public FileWorker {
 public:
  WriteZeroesWorker(Napi::Env env, std::shared_ptr<FileState> file, uint64_t offsetBytes, uint64_t lengthBytes,
                    bool mayDeallocate)
      : FileWorker(env, std::move(file)),
        fd_(file_->fd),
        offsetBytes_(offsetBytes),
        lengthBytes_(lengthBytes),
        mayDeallocate_(mayDeallocate) {}

 private:
  void Run() override {
    if (lengthBytes_ == 0) return;
    if (file_->isBlockDevice) {
      // BLKZEROOUT never deallocates; the kernel writes zeroes itself when the device cannot.
      uint64_t range[2] = {offsetBytes_, lengthBytes_};
      if (ioctl(fd_, BLKZEROOUT, range) < 0) Fail(SyscallError(errno, "ioctl(BLKZEROOUT)", file_->path, offsetBytes_, lengthBytes_));
      return;
    }
    int mode = mayDeallocate_ ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    if (fallocate(fd_, mode, static_cast<off_t>(offsetBytes_), static_cast<off_t>(lengthBytes_)) == 0) return;
    int fallocateErrno = errno;
    if (fallocateErrno != EOPNOTSUPP) {
      Fail(SyscallError(fallocateErrno, mayDeallocate_ ? "fallocate(PUNCH_HOLE)" : "fallocate(ZERO_RANGE)",
                        file_->path, offsetBytes_, lengthBytes_));
      return;
    }
    WriteZeroBytes();  // the file system has no such fallocate mode: write real zeroes
  }

  void WriteZeroBytes() {
    void* zeroes = nullptr;
    size_t chunkBytes = lengthBytes_ < kZeroChunkBytes ? lengthBytes_ : kZeroChunkBytes;
    int rc = posix_memalign(&zeroes, 4096, chunkBytes);
    if (rc != 0) {
      Fail(SyscallError(rc, "posix_memalign", file_->path));
      return;
    }
    memset(zeroes, 0, chunkBytes);
    uint64_t doneBytes = 0;
    while (doneBytes < lengthBytes_) {
      size_t stepBytes = lengthBytes_ - doneBytes < chunkBytes ? lengthBytes_ - doneBytes : chunkBytes;
      ssize_t written = pwrite(fd_, zeroes, stepBytes, static_cast<off_t>(offsetBytes_ + doneBytes));
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) {
        Fail(SyscallError(written < 0 ? errno : EIO, "pwrite", file_->path, offsetBytes_ + doneBytes, stepBytes));
        break;
      }
      doneBytes += static_cast<uint64_t>(written);
    }
    free(zeroes);
  }

  int fd_;
  uint64_t offsetBytes_;
  uint64_t lengthBytes_;
  bool mayDeallocate_;
};

struct Extent {
  uint64_t offsetBytes;
  uint64_t lengthBytes;
  bool hole;
};

class AllocationMapWorker : public FileWorker {
 public:
  AllocationMapWorker(Napi::Env env, std::shared_ptr<FileState> file, uint64_t offsetBytes, uint64_t lengthBytes)
      : FileWorker(env, std::move(file)), fd_(file_->fd), offsetBytes_(offsetBytes), lengthBytes_(lengthBytes) {}

 private:
  void Add(uint64_t startBytes, uint64_t endBytes, bool hole) {
    if (endBytes <= startBytes) return;
    if (!extents_.empty() && extents_.back().hole == hole &&
        extents_.back().offsetBytes + extents_.back().lengthBytes == startBytes) {
      extents_.back().lengthBytes += endBytes - startBytes;
      return;
    }
    extents_.push_back({startBytes, endBytes - startBytes, hole});
  }

  void Run() override {
    uint64_t endBytes = offsetBytes_ + lengthBytes_;
    if (file_->isBlockDevice) {
      Add(offsetBytes_, endBytes, false);
      return;
    }
    uint64_t position = offsetBytes_;
    while (position < endBytes) {
      if (extents_.size() >= kMaxAllocationExtents) {
        Add(position, endBytes, false);
        return;
      }
      off_t data = lseek(fd_, static_cast<off_t>(position), SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) {  // no data at or after position: the rest is a hole
          Add(position, endBytes, true);
          return;
        }
        Fail(SyscallError(errno, "lseek(SEEK_DATA)", file_->path, position, endBytes - position));
        return;
      }
      uint64_t dataStart = static_cast<uint64_t>(data) < endBytes ? static_cast<uint64_t>(data) : endBytes;
      Add(position, dataStart, true);
      position = dataStart;
      if (position >= endBytes) return;
      off_t hole = lseek(fd_, static_cast<off_t>(position), SEEK_HOLE);
      if (hole < 0) {
        Fail(SyscallError(errno, "lseek(SEEK_HOLE)", file_->path, position, endBytes - position));
        return;
      }
      uint64_t dataEnd = static_cast<uint64_t>(hole) < endBytes ? static_cast<uint64_t>(hole) : endBytes;
      if (dataEnd <= position) dataEnd = endBytes;  // file changed under us: report data, never loop
      Add(position, dataEnd, false);
      position = dataEnd;
    }
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Array array = Napi::Array::New(env, extents_.size());
    for (size_t i = 0; i < extents_.size(); i++) {
      Napi::Object extent = Napi::Object::New(env);
      extent.Set("offsetBytes", static_cast<double>(extents_[i].offsetBytes));
      extent.Set("lengthBytes", static_cast<double>(extents_[i].lengthBytes));
      extent.Set("hole", extents_[i].hole);
      array.Set(static_cast<uint32_t>(i), extent);
    }
    return array;
  }

  int fd_;
  uint64_t offsetBytes_;
  uint64_t lengthBytes_;
  std::vector<Extent> extents_;
};

// ---------------------------------------------------------------------------------------------
// FileHandle

class FileHandle : public Napi::ObjectWrap<FileHandle> {
 public:
  static Napi::Function DefineClass(Napi::Env env) {
    return ObjectWrap<FileHandle>::DefineClass(env, "FileHandle",
                                               {
                                                   InstanceMethod<&FileHandle::Info>("info"),
                                                   InstanceMethod<&FileHandle::Read>("read"),
                                                   InstanceMethod<&FileHandle::Write>("write"),
                                                   InstanceMethod<&FileHandle::Flush>("flush"),
                                                   InstanceMethod<&FileHandle::Discard>("discard"),
                                                   InstanceMethod<&FileHandle::WriteZeroes>("writeZeroes"),
                                                   InstanceMethod<&FileHandle::AllocationMap>("allocationMap"),
                                                   InstanceMethod<&FileHandle::Close>("close"),
                                               });
  }

  explicit FileHandle(const Napi::CallbackInfo& info) : ObjectWrap<FileHandle>(info) {
    napi_type_tag_object(info.Env(), info.This(), &kFileHandleTag);
  }

  void Attach(std::shared_ptr<FileState> file) { file_ = std::move(file); }

 private:
  Napi::Value Info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    RequireAttached(env);
    Napi::Object result = Napi::Object::New(env);
    result.Set("path", file_->path);
    result.Set("sizeBytes", static_cast<double>(file_->sizeBytes));
    result.Set("logicalSectorBytes", file_->logicalSectorBytes);
    result.Set("physicalSectorBytes", file_->physicalSectorBytes);
    result.Set("isBlockDevice", file_->isBlockDevice);
    result.Set("readOnly", file_->readOnly);
    result.Set("engine", file_->engine->name());
    return result;
  }

  void RequireAttached(Napi::Env env) {
    if (!file_) throw Napi::TypeError::New(env, "FileHandle is created by open() only");
  }

  void RequireOpen(Napi::Env env, const char* syscall) {
    RequireAttached(env);
    if (file_->closing) throw MakeNativeError(env, SyscallError(EBADF, syscall, file_->path));
  }

  void RequireWritable(Napi::Env env) {
    if (file_->readOnly) {
      throw MakeNativeError(env, ValidationError("BM_ERR_READ_ONLY", file_->path + " is open read-only", file_->path));
    }
  }

  void RequireRange(Napi::Env env, uint64_t offsetBytes, uint64_t lengthBytes, bool aligned) {
    uint64_t sector = file_->logicalSectorBytes;
    if (aligned && (offsetBytes % sector != 0 || lengthBytes % sector != 0)) {
      ErrorInfo error = ValidationError("BM_ERR_UNALIGNED",
                                        "offset " + std::to_string(offsetBytes) + " and length " +
                                            std::to_string(lengthBytes) + " must be multiples of " +
                                            std::to_string(sector) + " bytes",
                                        file_->path);
      error.hasRange = true;
      error.offsetBytes = offsetBytes;
      error.lengthBytes = lengthBytes;
      throw MakeNativeError(env, error);
    }
    if (offsetBytes > file_->sizeBytes || lengthBytes > file_->sizeBytes - offsetBytes) {
      ErrorInfo error = ValidationError("BM_ERR_OUT_OF_RANGE",
                                        "range @" + std::to_string(offsetBytes) + "+" + std::to_string(lengthBytes) +
                                            " is outside " + file_->path + " (" +
                                            std::to_string(file_->sizeBytes) + " bytes)",
                                        file_->path);
      error.hasRange = true;
      error.offsetBytes = offsetBytes;
      error.lengthBytes = lengthBytes;
      throw MakeNativeError(env, error);
    }
  }

  Napi::Value ReadWrite(const Napi::CallbackInfo& info, OpKind kind) {
    Napi::Env env = info.Env();
    RequireOpen(env, kind == OpKind::kRead ? "pread" : "pwrite");
    if (kind == OpKind::kWrite) RequireWritable(env);
    Napi::Buffer<uint8_t> buffer = ArgBuffer(info, 0, "buffer");
    uint64_t offsetBytes = ArgU64(info, 1, "offsetBytes");
    bool fua = kind == OpKind::kWrite ? ArgBool(info, 2, "fua") : false;
    if (buffer.Length() > kMaxIoBytes) throw Napi::RangeError::New(env, "buffer must be at most 1 GiB");
    if (reinterpret_cast<uintptr_t>(buffer.Data()) % file_->logicalSectorBytes != 0) {
      ErrorInfo error = ValidationError(
          "BM_ERR_UNALIGNED",
          "buffer address must be a multiple of " + std::to_string(file_->logicalSectorBytes) +
              " bytes for O_DIRECT (use allocAligned or BufferPool)",
          file_->path);
      error.hasRange = true;
      error.offsetBytes = offsetBytes;
      error.lengthBytes = buffer.Length();
      throw MakeNativeError(env, error);
    }
    RequireRange(env, offsetBytes, buffer.Length(), true);
    return file_->engine->ReadWrite(env, file_, kind, buffer, offsetBytes, fua);
  }

  Napi::Value Read(const Napi::CallbackInfo& info) { return ReadWrite(info, OpKind::kRead); }
  Napi::Value Write(const Napi::CallbackInfo& info) { return ReadWrite(info, OpKind::kWrite); }

  Napi::Value Flush(const Napi::CallbackInfo& info) {
    RequireOpen(info.Env(), "fdatasync");
    return file_->engine->Flush(info.Env(), file_);
  }

  Napi::Value Discard(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    RequireOpen(env, "discard");
    RequireWritable(env);
    uint64_t offsetBytes = ArgU64(info, 0, "offsetBytes");
    uint64_t lengthBytes = ArgU64(info, 1, "lengthBytes");
    RequireRange(env, offsetBytes, lengthBytes, true);
    return (new DiscardWorker(env, file_, offsetBytes, lengthBytes))->Start();
  }

  Napi::Value WriteZeroes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    RequireOpen(env, "writeZeroes");
    RequireWritable(env);
    uint64_t offsetBytes = ArgU64(info, 0, "offsetBytes");
    uint64_t lengthBytes = ArgU64(info, 1, "lengthBytes");
    bool mayDeallocate = ArgBool(info, 2, "mayDeallocate");
    RequireRange(env, offsetBytes, lengthBytes, true);
    return (new WriteZeroesWorker(env, file_, offsetBytes, lengthBytes, mayDeallocate))->Start();
  }

  Napi::Value AllocationMap(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    RequireOpen(env, "lseek");
    uint64_t offsetBytes = ArgU64(info, 0, "offsetBytes");
    uint64_t lengthBytes = ArgU64(info, 1, "lengthBytes");
    RequireRange(env, offsetBytes, lengthBytes, false);
    return (new AllocationMapWorker(env, file_, offsetBytes, lengthBytes))->Start();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    RequireOpen(env, "close");
    file_->closing = true;
    napi_deferred deferred;
    napi_value promise;
    NAPI_THROW_IF_FAILED(env, napi_create_promise(env, &deferred, &promise), Napi::Value());
    file_->closeWaiters.push_back(deferred);
    if (file_->inflight == 0) file_->CloseNow(env);  // otherwise the last op to settle closes it
    return Napi::Value(env, promise);
  }

  std::shared_ptr<FileState> file_;
};

// ---------------------------------------------------------------------------------------------
// open

static IoEngine* SelectEngine(Napi::Env env, const std::string& engineName) {
  AddonData& data = GetAddonData(env);
  bool wantUring = engineName == "io_uring" || (engineName.empty() && !data.uringDisabledByEnv);
  if (engineName != "" && engineName != "io_uring" && engineName != "threadpool") {
    throw Napi::RangeError::New(env, "ioEngine must be 'io_uring' or 'threadpool'");
  }
  if (wantUring) {
    if (!data.uring && data.uringSetupErrno == 0) {
      data.uring = CreateUringEngine(env, &data.uringSetupErrno);
      if (data.uring) data.uring->SetBusyPoll(data.busyPollMaxNs);
    }
    if (data.uring) return data.uring.get();
    if (engineName == "io_uring") {
      ErrorInfo error = SyscallError(data.uringSetupErrno, "io_uring_setup", "");
      error.code = "BM_ERR_IO_URING_UNAVAILABLE";
      throw MakeNativeError(env, error);
    }
  }
  if (!data.threadpool) data.threadpool = CreateThreadpoolEngine();
  return data.threadpool.get();
}

static void ReadGeometry(FileState& file, const struct stat& st) {
  if (file.isBlockDevice) {
    uint64_t sizeBytes = 0;
    int logical = 0;
    unsigned int physical = 0;
    if (ioctl(file.fd, BLKGETSIZE64, &sizeBytes) < 0) throw SyscallError(errno, "ioctl(BLKGETSIZE64)", file.path);
    if (ioctl(file.fd, BLKSSZGET, &logical) < 0) throw SyscallError(errno, "ioctl(BLKSSZGET)", file.path);
    if (ioctl(file.fd, BLKPBSZGET, &physical) < 0) throw SyscallError(errno, "ioctl(BLKPBSZGET)", file.path);
    file.sizeBytes = sizeBytes;
    file.logicalSectorBytes = static_cast<uint32_t>(logical);
    file.physicalSectorBytes = physical;
    return;
  }
  file.sizeBytes = static_cast<uint64_t>(st.st_size);
  file.logicalSectorBytes = 512;
  file.physicalSectorBytes = static_cast<uint32_t>(st.st_blksize);
  // The file system knows its real O_DIRECT alignment (Linux 6.1+); 512 is the classic answer.
  struct statx stx;
  if (statx(file.fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) != 0 &&
      stx.stx_dio_offset_align != 0) {
    uint32_t align = stx.stx_dio_offset_align;
    if (stx.stx_dio_mem_align > align) align = stx.stx_dio_mem_align;
    file.logicalSectorBytes = align;
  }
}

static Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = ArgString(info, 0, "path");
  bool readOnly = ArgBool(info, 1, "readOnly");
  bool exclusive = ArgBool(info, 2, "exclusive");
  std::string engineName = ArgString(info, 3, "ioEngine");
  IoEngine* engine = SelectEngine(env, engineName);

  struct stat st;
  if (stat(path.c_str(), &st) < 0) throw MakeNativeError(env, SyscallError(errno, "stat", path));
  bool isBlockDevice = S_ISBLK(st.st_mode);
  if (!isBlockDevice && !S_ISREG(st.st_mode)) {
    throw MakeNativeError(env, ValidationError("BM_ERR_NOT_BLOCK_OR_FILE",
                                               path + " is neither a block device nor a regular file", path));
  }
  int flags = (readOnly ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC;
  if (isBlockDevice && exclusive) flags |= O_EXCL;
  int fd;
  do {
    fd = ::open(path.c_str(), flags);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    ErrorInfo error = SyscallError(errno, "open", path);
    if (errno == EINVAL) error.message += " (O_DIRECT refused by the file system?)";
    throw MakeNativeError(env, error);
  }
  auto file = std::make_shared<FileState>();
  file->fd = fd;  // owned from here: FileState closes it if anything below throws
  file->path = path;
  file->readOnly = readOnly;
  file->engine = engine;
  struct stat opened;
  if (fstat(fd, &opened) < 0) throw MakeNativeError(env, SyscallError(errno, "fstat", path));
  file->isBlockDevice = S_ISBLK(opened.st_mode);
  if (file->isBlockDevice != isBlockDevice) {
    throw MakeNativeError(env, ValidationError("BM_ERR_NOT_BLOCK_OR_FILE", path + " changed type while opening", path));
  }
  try {
    ReadGeometry(*file, opened);
  } catch (const ErrorInfo& error) {
    throw MakeNativeError(env, error);
  }
  if (file->logicalSectorBytes == 0 || (file->logicalSectorBytes & (file->logicalSectorBytes - 1)) != 0) {
    throw MakeNativeError(env, ValidationError("BM_ERR_NOT_BLOCK_OR_FILE", path + " reports an invalid sector size", path));
  }

  Napi::Object handle = GetAddonData(env).fileHandleClass.New({});
  FileHandle::Unwrap(handle)->Attach(std::move(file));
  return handle;
}

void InitFileHandle(Napi::Env env, Napi::Object exports) {
  Napi::Function handleClass = FileHandle::DefineClass(env);
  GetAddonData(env).fileHandleClass = Napi::Persistent(handleClass);
  exports.Set("open", Napi::Function::New(env, Open, "open"));
}

}  // namespace bm
