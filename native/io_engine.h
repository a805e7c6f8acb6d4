// I/O engines behind BlockFile: io_uring (one ring per environment, batched submission) and the
// libuv thread pool (one work item per op). Both settle Promises on the JS thread.
#pragma once

#include <napi.h>
#include <uv.h>

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "busy_poll.h"
#include "common.h"
#include "uring.h"

namespace bm {

// An open file or device, shared by the JS handle and every op in flight on it, so the
// descriptor outlives a handle that is garbage-collected while I/O is still running.
struct FileState {
  int fd = -1;
  std::string path;
  bool readOnly = false;
  bool isBlockDevice = false;
  uint64_t sizeBytes = 0;
  uint32_t logicalSectorBytes = 512;
  uint32_t physicalSectorBytes = 4096;
  IoEngine* engine = nullptr;

  uint32_t inflight = 0;  // ops started and not yet settled (all engines and helpers)
  bool closing = false;   // close() called: new ops are refused with EBADF
  std::vector<napi_deferred> closeWaiters;

  ~FileState();
  void OpStarted() { inflight++; }
  // Called after an op settled; performs a pending close once the last op is done.
  void OpFinished(Napi::Env env);
  // Closes the descriptor now (no op in flight) and settles every close() waiter.
  void CloseNow(Napi::Env env);
};

enum class OpKind : uint8_t { kRead, kWrite, kFlush };

const char* OpSyscallName(OpKind kind, bool fua);

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  virtual const char* name() const = 0;
  // Starts a read or write of the whole buffer at offsetBytes. Arguments are already validated.
  virtual Napi::Value ReadWrite(Napi::Env env, const std::shared_ptr<FileState>& file, OpKind kind,
                                Napi::Buffer<uint8_t> buffer, uint64_t offsetBytes, bool fua) = 0;
  // fdatasync.
  virtual Napi::Value Flush(Napi::Env env, const std::shared_ptr<FileState>& file) = 0;
  // Busy polling (busy_poll.h); maxNs 0 turns it off. Engines without an event-loop hook ignore it.
  virtual void SetBusyPoll(uint64_t maxNs) {}
  virtual BusyPollStats GetBusyPollStats() const { return BusyPollStats(); }
};

// Creates the io_uring engine; returns null and sets *errnoOut when the kernel refuses it.
std::unique_ptr<IoEngine> CreateUringEngine(Napi::Env env, int* errnoOut);
std::unique_ptr<IoEngine> CreateThreadpoolEngine();

// Base for thread-pool work on a file: Run() executes off the JS thread and records an error;
// the Promise settles on the JS thread, then the file's in-flight count drops.
class FileWorker : public Napi::AsyncWorker {
 public:
  FileWorker(Napi::Env env, std::shared_ptr<FileState> file);
  Napi::Promise Start();

 protected:
  virtual void Run() = 0;  // worker thread: no JS here
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }
  void Fail(const ErrorInfo& error) {
    failed_ = true;
    error_ = error;
  }
  std::shared_ptr<FileState> file_;

 private:
  void Execute() override { Run(); }
  void OnOK() override;
  void OnError(const Napi::Error& error) override;
  Napi::Promise::Deferred deferred_;
  bool failed_ = false;
  ErrorInfo error_;
};

}  // namespace bm
