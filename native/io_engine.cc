#include "io_engine.h"

#include <cstdlib>
#include <sched.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>

namespace bm {

// ---------------------------------------------------------------------------------------------
// FileState

FileState::~FileState() {
  // Only reached when the handle was collected without close(): nothing is in flight then.
  if (fd >= 0) ::close(fd);
}

void FileState::OpFinished(Napi::Env env) {
  assert(inflight > 0);
  inflight--;
  if (closing && inflight == 0 && fd >= 0) CloseNow(env);
}

void FileState::CloseNow(Napi::Env env) {
  assert(inflight == 0);
  int rc = ::close(fd);
  int closeErrno = rc < 0 ? errno : 0;
  fd = -1;
  std::vector<napi_deferred> waiters;
  waiters.swap(closeWaiters);
  for (napi_deferred deferred : waiters) {
    // close(2) releases the descriptor even when it reports an error (EINTR/EIO): report, never retry.
    if (closeErrno != 0) {
      napi_reject_deferred(env, deferred, MakeNativeError(env, SyscallError(closeErrno, "close", path)).Value());
    } else {
      napi_resolve_deferred(env, deferred, env.Undefined());
    }
  }
}

const char* OpSyscallName(OpKind kind, bool fua) {
  switch (kind) {
    case OpKind::kRead:
      return "pread";
    case OpKind::kWrite:
      return fua ? "pwritev2" : "pwrite";
    case OpKind::kFlush:
      return "fdatasync";
  }
  return "?";
}

static ErrorInfo ShortIoError(OpKind kind, const FileState& file, uint64_t offsetBytes, uint64_t lengthBytes,
                              uint64_t doneBytes) {
  ErrorInfo info;
  info.code = "BM_ERR_SHORT_IO";
  info.errnoValue = 0;
  info.syscall = OpSyscallName(kind, false);
  info.path = file.path;
  info.hasRange = true;
  info.offsetBytes = offsetBytes;
  info.lengthBytes = lengthBytes;
  info.message = info.syscall + " " + file.path + " @" + std::to_string(offsetBytes) + "+" +
                 std::to_string(lengthBytes) + ": short " + (kind == OpKind::kRead ? "read" : "write") + " (" +
                 std::to_string(doneBytes) + " bytes)";
  return info;
}

// ---------------------------------------------------------------------------------------------
// FileWorker

FileWorker::FileWorker(Napi::Env env, std::shared_ptr<FileState> file)
    : Napi::AsyncWorker(env, "blockmirror:io"), file_(std::move(file)), deferred_(Napi::Promise::Deferred::New(env)) {}

Napi::Promise FileWorker::Start() {
  Napi::Promise promise = deferred_.Promise();
  Queue();
  file_->OpStarted();  // only once queued: a Queue() that throws must not leave close() waiting
  return promise;
}

void FileWorker::OnOK() {
  Napi::Env env = Env();
  // As in the io_uring engine: building the error is the part that can throw, and the op must
  // still settle and count as finished, or its caller and close() would wait forever.
  try {
    if (failed_) {
      deferred_.Reject(MakeNativeError(env, error_).Value());
    } else {
      deferred_.Resolve(Result(env));
    }
  } catch (const Napi::Error& error) {
    deferred_.Reject(error.Value());
  }
  file_->OpFinished(env);
}

void FileWorker::OnError(const Napi::Error& error) {
  deferred_.Reject(error.Value());
  file_->OpFinished(Env());
}

// ---------------------------------------------------------------------------------------------
// Thread-pool engine: one libuv work item per op; pread / pwritev2(RWF_DSYNC) / fdatasync.

class RwWorker : public FileWorker {
 public:
  RwWorker(Napi::Env env, std::shared_ptr<FileState> file, OpKind kind, Napi::Buffer<uint8_t> buffer,
           uint64_t offsetBytes, bool fua)
      : FileWorker(env, std::move(file)),
        kind_(kind),
        bufferRef_(Napi::Persistent(buffer.As<Napi::Object>())),
        data_(buffer.Data()),
        lengthBytes_(buffer.Length()),
        offsetBytes_(offsetBytes),
        fua_(fua),
        fd_(file_->fd) {}

 private:
  void Run() override {
    ssize_t done;
    if (kind_ == OpKind::kRead) {
      do {
        done = pread(fd_, data_, lengthBytes_, static_cast<off_t>(offsetBytes_));
      } while (done < 0 && errno == EINTR);
    } else {
      iovec iov{data_, lengthBytes_};
      do {
        done = pwritev2(fd_, &iov, 1, static_cast<off_t>(offsetBytes_), fua_ ? RWF_DSYNC : 0);
      } while (done < 0 && errno == EINTR);
    }
    if (done < 0) {
      Fail(SyscallError(errno, OpSyscallName(kind_, fua_), file_->path, offsetBytes_, lengthBytes_));
    } else if (static_cast<size_t>(done) != lengthBytes_) {
      Fail(ShortIoError(kind_, *file_, offsetBytes_, lengthBytes_, static_cast<uint64_t>(done)));
    }
  }

  OpKind kind_;
  Napi::ObjectReference bufferRef_;  // keeps the memory alive until the op completes
  uint8_t* data_;
  size_t lengthBytes_;
  uint64_t offsetBytes_;
  bool fua_;
  int fd_;
};

class FlushWorker : public FileWorker {
 public:
  FlushWorker(Napi::Env env, std::shared_ptr<FileState> file) : FileWorker(env, std::move(file)), fd_(file_->fd) {}

 private:
  void Run() override {
    if (fdatasync(fd_) < 0) Fail(SyscallError(errno, "fdatasync", file_->path));
  }
  int fd_;
};

class ThreadpoolEngine : public IoEngine {
 public:
  const char* name() const override { return "threadpool"; }
  Napi::Value ReadWrite(Napi::Env env, const std::shared_ptr<FileState>& file, OpKind kind,
                        Napi::Buffer<uint8_t> buffer, uint64_t offsetBytes, bool fua) override {
    return (new RwWorker(env, file, kind, buffer, offsetBytes, fua))->Start();
  }
  Napi::Value Flush(Napi::Env env, const std::shared_ptr<FileState>& file) override {
    return (new FlushWorker(env, file))->Start();
  }
};

std::unique_ptr<IoEngine> CreateThreadpoolEngine() { return std::make_unique<ThreadpoolEngine>(); }

// ---------------------------------------------------------------------------------------------
// io_uring engine.
//
// A JS call writes an SQE into the shared ring and returns: no syscall. Everything queued during a
// loop iteration is submitted with one io_uring_enter from a uv_check handle (after the poll phase,
// where completions settle and JS reacts to them) and from a uv_prepare handle (before the loop
// blocks, covering ops queued from timers or at startup). A uv_poll watches the ring's own fd,
// which polls readable while completions wait (no eventfd: that was one more signal and one more
// read(2) per wake-up, and measured slower at QD1); each wake-up reaps all CQEs and settles their
// Promises in one scope.
// In-flight ops are bounded by the CQ size; the rest wait in a FIFO.
//
// Busy polling (off unless SetBusyPoll): at queue depth 1 the loop would sleep twice per request,
// once for the op's completion and once for the client's next request. Instead, after submitting
// a lone op the check handle watches the completion ring, yielding the CPU between looks (the
// loop device's worker may need this very vCPU: a plain spin measured slower), and before the
// loop blocks with nothing in flight the prepare handle polls the loop's epoll fd. Neither starts
// when the loop has work ready (immediates, due timers); once started, a spin ends at its budget
// at the latest (32 us by default), so another socket or a timer waits at most that long. Both
// budgets adapt (busy_poll.h).

constexpr unsigned kSqEntries = 512;
constexpr unsigned kCqEntries = 1024;
constexpr unsigned kReapBatch = 256;
constexpr unsigned kPollChainMax = 8;  // lone ops polled for back to back in one loop phase

struct UringOp {
  std::shared_ptr<FileState> file;
  napi_deferred deferred = nullptr;
  napi_ref bufferRef = nullptr;  // keeps the Buffer's memory alive while the kernel uses it
  uint8_t* data = nullptr;
  uint32_t lengthBytes = 0;
  uint64_t offsetBytes = 0;
  OpKind kind = OpKind::kRead;
  bool fua = false;
};

// libuv handles live in their own allocation: uv_close completes asynchronously, possibly after
// the engine is gone.
struct UringHandles {
  uv_poll_t poll;
  uv_prepare_t prepare;
  uv_check_t check;
  uv_idle_t idle;
  int closing = 0;
};

class UringEngine : public IoEngine {
 public:
  explicit UringEngine(Napi::Env env) : env_(env) {}
  ~UringEngine() override { Shutdown(); }

  int Init();
  const char* name() const override { return "io_uring"; }
  Napi::Value ReadWrite(Napi::Env env, const std::shared_ptr<FileState>& file, OpKind kind,
                        Napi::Buffer<uint8_t> buffer, uint64_t offsetBytes, bool fua) override;
  Napi::Value Flush(Napi::Env env, const std::shared_ptr<FileState>& file) override;

 private:
  Napi::Value Enqueue(UringOp&& op);
  bool Dispatch(UringOp&& op);  // into a slot and an SQE; false when neither is free
  void DrainOverflow();
  int SubmitPending();  // returns the number of SQEs the kernel took
  int OnTick();         // prepare, check and idle handles
  void Reap();
  void Complete(UringOp& op, int32_t result);
  napi_value Outcome(const UringOp& op, int32_t result, bool* ok);
  void UpdateRef();
  void Shutdown();
  size_t InFlight() const { return slots_.size() - freeSlots_.size(); }

  void SetBusyPoll(uint64_t maxNs) override;
  BusyPollStats GetBusyPollStats() const override { return pollStats_; }
  void SubmitAndPoll();     // prepare and check handles
  void PollBeforeBlock();   // prepare handle, last
  void LearnBlockedWait();  // check handle, first: after the loop's poll phase
  // After submitting: spins for the completion of a lone op; true when it caught and reaped it.
  bool PollLoneCompletion(int submitted);

  static void OnPoll(uv_poll_t* handle, int status, int events);
  static void OnPrepare(uv_prepare_t* handle);
  static void OnCheck(uv_check_t* handle);
  static void OnIdle(uv_idle_t* handle);

  Napi::Env env_;
  Ring ring_;
  UringHandles* handles_ = nullptr;
  bool referenced_ = false;
  bool idleActive_ = false;
  bool shutDown_ = false;
  std::unique_ptr<Napi::AsyncContext> asyncContext_;
  std::vector<UringOp> slots_;
  std::vector<uint32_t> freeSlots_;
  std::deque<UringOp> overflow_;
  io_uring_cqe cqeBatch_[kReapBatch];

  uv_loop_t* loop_ = nullptr;
  BusyPollStats pollStats_;
  AdaptiveBudget eventBudget_;
  AdaptiveBudget completionBudget_;
  bool blockWaitMeasured_ = false;  // the loop went to wait with nothing in flight, not caught by polling
  uint64_t blockWaitStartNs_ = 0;
  uint64_t blockSpunNs_ = 0;       // of that wait, the part spent polling
  uint64_t blockIdleStartNs_ = 0;  // libuv's idle-time counter when the loop went to sleep
  bool loneOpMeasured_ = false;  // a lone op was submitted and its completion not caught by polling
  uint64_t loneOpStartNs_ = 0;
};

int UringEngine::Init() {
  int rc = ring_.Setup(kSqEntries, kCqEntries);
  if (rc != 0) return rc;

  slots_.resize(ring_.cqEntries());
  freeSlots_.reserve(ring_.cqEntries());
  for (uint32_t i = ring_.cqEntries(); i > 0; i--) freeSlots_.push_back(i - 1);

  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env_, &loop) != napi_ok) return EINVAL;
  loop_ = loop;
  // Node turns this on for its event-loop utilisation; asking again costs nothing and makes sure
  // uv_metrics_idle_time counts (the busy-poll budgets learn from it).
  uv_loop_configure(loop, UV_METRICS_IDLE_TIME);
  handles_ = new UringHandles();
  handles_->poll.data = this;
  handles_->prepare.data = this;
  handles_->check.data = this;
  handles_->idle.data = this;
  if (uv_poll_init(loop, &handles_->poll, ring_.fd()) != 0) {
    delete handles_;
    handles_ = nullptr;
    return EINVAL;
  }
  uv_prepare_init(loop, &handles_->prepare);
  uv_check_init(loop, &handles_->check);
  uv_idle_init(loop, &handles_->idle);
  uv_poll_start(&handles_->poll, UV_READABLE, OnPoll);
  uv_prepare_start(&handles_->prepare, OnPrepare);
  uv_check_start(&handles_->check, OnCheck);
  // Idle engine: none of the handles may keep Node alive. UpdateRef refs the poll while ops run.
  uv_unref(reinterpret_cast<uv_handle_t*>(&handles_->poll));
  uv_unref(reinterpret_cast<uv_handle_t*>(&handles_->prepare));
  uv_unref(reinterpret_cast<uv_handle_t*>(&handles_->check));
  uv_unref(reinterpret_cast<uv_handle_t*>(&handles_->idle));

  Napi::HandleScope scope(env_);
  asyncContext_ = std::make_unique<Napi::AsyncContext>(env_, "blockmirror:io_uring");
  return 0;
}

Napi::Value UringEngine::ReadWrite(Napi::Env env, const std::shared_ptr<FileState>& file, OpKind kind,
                                   Napi::Buffer<uint8_t> buffer, uint64_t offsetBytes, bool fua) {
  UringOp op;
  op.file = file;
  op.kind = kind;
  op.fua = fua;
  op.data = buffer.Data();
  op.lengthBytes = static_cast<uint32_t>(buffer.Length());
  op.offsetBytes = offsetBytes;
  NAPI_THROW_IF_FAILED(env, napi_create_reference(env, buffer, 1, &op.bufferRef), Napi::Value());
  return Enqueue(std::move(op));
}

Napi::Value UringEngine::Flush(Napi::Env env, const std::shared_ptr<FileState>& file) {
  UringOp op;
  op.file = file;
  op.kind = OpKind::kFlush;
  return Enqueue(std::move(op));
}

Napi::Value UringEngine::Enqueue(UringOp&& op) {
  napi_value promise;
  NAPI_THROW_IF_FAILED(env_, napi_create_promise(env_, &op.deferred, &promise), Napi::Value());
  op.file->OpStarted();
  // FIFO order: nothing may overtake ops already waiting for a slot.
  if (!overflow_.empty() || !Dispatch(std::move(op))) overflow_.push_back(std::move(op));
  UpdateRef();
  return Napi::Value(env_, promise);
}

bool UringEngine::Dispatch(UringOp&& op) {
  if (freeSlots_.empty()) return false;
  io_uring_sqe* sqe = ring_.GetSqe();
  if (sqe == nullptr) {
    SubmitPending();  // the submission ring is full: hand it to the kernel now
    sqe = ring_.GetSqe();
    if (sqe == nullptr) return false;
  }
  uint32_t slot = freeSlots_.back();
  freeSlots_.pop_back();
  UringOp& stored = slots_[slot];
  stored = std::move(op);
  sqe->fd = stored.file->fd;
  sqe->user_data = slot;
  switch (stored.kind) {
    case OpKind::kRead:
      sqe->opcode = IORING_OP_READ;
      sqe->addr = reinterpret_cast<uint64_t>(stored.data);
      sqe->len = stored.lengthBytes;
      sqe->off = stored.offsetBytes;
      break;
    case OpKind::kWrite:
      sqe->opcode = IORING_OP_WRITE;
      sqe->addr = reinterpret_cast<uint64_t>(stored.data);
      sqe->len = stored.lengthBytes;
      sqe->off = stored.offsetBytes;
      sqe->rw_flags = stored.fua ? RWF_DSYNC : 0;
      break;
    case OpKind::kFlush:
      sqe->opcode = IORING_OP_FSYNC;
      sqe->fsync_flags = IORING_FSYNC_DATASYNC;
      break;
  }
  return true;
}

void UringEngine::DrainOverflow() {
  while (!overflow_.empty()) {
    if (!Dispatch(std::move(overflow_.front()))) break;
    overflow_.pop_front();
  }
}

int UringEngine::OnTick() {
  // Overflow normally drains as completions free slots; this covers a submit that failed earlier.
  if (!overflow_.empty()) DrainOverflow();
  return SubmitPending();
}

// Must not touch the overflow FIFO: Dispatch calls it while an overflow entry is being moved.
int UringEngine::SubmitPending() {
  if (ring_.pendingSubmit() == 0) return 0;
  int rc = ring_.Submit();
  // EAGAIN/EBUSY: the kernel is short of memory or completions; retry on the next loop turn
  // without letting the loop block (idle handle) so queued SQEs are never stranded.
  bool stranded = rc < 0 || ring_.pendingSubmit() > 0;
  if (stranded && !idleActive_) {
    uv_idle_start(&handles_->idle, OnIdle);
    idleActive_ = true;
  } else if (!stranded && idleActive_) {
    uv_idle_stop(&handles_->idle);
    idleActive_ = false;
  }
  return rc > 0 ? rc : 0;
}

void UringEngine::Reap() {
  if (loneOpMeasured_) {
    loneOpMeasured_ = false;
    completionBudget_.Learn(MonotonicNs() - loneOpStartNs_, pollStats_.maxNs);
  }
  Napi::HandleScope handleScope(env_);
  // Settling inside a callback scope makes Node run the microtask queue when it closes.
  Napi::CallbackScope callbackScope(env_, *asyncContext_);
  for (;;) {
    unsigned count = ring_.Reap(cqeBatch_, kReapBatch);
    if (count == 0) break;
    for (unsigned i = 0; i < count; i++) {
      uint32_t slot = static_cast<uint32_t>(cqeBatch_[i].user_data);
      assert(slot < slots_.size());
      UringOp op = std::move(slots_[slot]);
      slots_[slot] = UringOp();
      freeSlots_.push_back(slot);
      Complete(op, cqeBatch_[i].res);
    }
    DrainOverflow();
  }
  UpdateRef();
}

void UringEngine::Complete(UringOp& op, int32_t result) {
  if (op.bufferRef != nullptr) napi_delete_reference(env_, op.bufferRef);
  napi_value outcome;
  bool ok = false;
  // This runs from a libuv callback: a C++ exception escaping it would abort the process, and a
  // Promise left pending would hang its caller. Building the error is the only part that can throw.
  try {
    outcome = Outcome(op, result, &ok);
  } catch (const Napi::Error& error) {
    outcome = error.Value();
    ok = false;
  }
  if (ok) {
    napi_resolve_deferred(env_, op.deferred, outcome);
  } else {
    napi_reject_deferred(env_, op.deferred, outcome);
  }
  op.file->OpFinished(env_);
}

napi_value UringEngine::Outcome(const UringOp& op, int32_t result, bool* ok) {
  napi_value outcome;
  if (result < 0) {
    ErrorInfo info = op.kind == OpKind::kFlush
                         ? SyscallError(-result, "fdatasync", op.file->path)
                         : SyscallError(-result, OpSyscallName(op.kind, op.fua), op.file->path, op.offsetBytes,
                                        op.lengthBytes);
    outcome = MakeNativeError(env_, info).Value();
  } else if (op.kind != OpKind::kFlush && static_cast<uint32_t>(result) != op.lengthBytes) {
    outcome = MakeNativeError(env_, ShortIoError(op.kind, *op.file, op.offsetBytes, op.lengthBytes,
                                                 static_cast<uint64_t>(result)))
                  .Value();
  } else {
    *ok = true;
    napi_get_undefined(env_, &outcome);
  }
  return outcome;
}

void UringEngine::UpdateRef() {
  bool busy = freeSlots_.size() != slots_.size() || !overflow_.empty();
  if (busy == referenced_) return;
  referenced_ = busy;
  if (busy) {
    uv_ref(reinterpret_cast<uv_handle_t*>(&handles_->poll));
  } else {
    uv_unref(reinterpret_cast<uv_handle_t*>(&handles_->poll));
  }
}

void UringEngine::Shutdown() {
  if (shutDown_) return;
  shutDown_ = true;
  if (handles_ != nullptr) {
    // The environment is going away: wait for the kernel to finish with every buffer before the
    // memory can be freed, then drop the ops without settling (no JS may run now).
    ring_.Submit();
    // SQEs the kernel never took cannot complete: wait only for the ones it holds.
    size_t inflight = slots_.size() - freeSlots_.size() - ring_.pendingSubmit();
    while (inflight > 0) {
      // Freeing buffers the kernel may still write into would corrupt memory: if waiting fails
      // there is no safe way on, so stop here.
      if (ring_.WaitCompletions(1) < 0) abort();
      size_t reaped = ring_.Reap(cqeBatch_, kReapBatch);
      inflight = reaped >= inflight ? 0 : inflight - reaped;
    }
    for (auto* handle : {reinterpret_cast<uv_handle_t*>(&handles_->poll),
                         reinterpret_cast<uv_handle_t*>(&handles_->prepare),
                         reinterpret_cast<uv_handle_t*>(&handles_->check),
                         reinterpret_cast<uv_handle_t*>(&handles_->idle)}) {
      handle->data = handles_;
      uv_close(handle, [](uv_handle_t* closed) {
        auto* owner = static_cast<UringHandles*>(closed->data);
        if (++owner->closing == 4) delete owner;
      });
    }
    handles_ = nullptr;
  }
}

void UringEngine::OnPoll(uv_poll_t* handle, int status, int /*events*/) {
  auto* engine = static_cast<UringEngine*>(handle->data);
  if (status < 0) return;
  engine->Reap();
}

void UringEngine::OnPrepare(uv_prepare_t* handle) {
  auto* engine = static_cast<UringEngine*>(handle->data);
  engine->SubmitAndPoll();
  engine->PollBeforeBlock();
}

void UringEngine::OnCheck(uv_check_t* handle) {
  auto* engine = static_cast<UringEngine*>(handle->data);
  engine->LearnBlockedWait();
  engine->SubmitAndPoll();
}

void UringEngine::SubmitAndPoll() {
  // The JS a caught completion runs may start the next op of a chain (write then flush, the
  // read and write of a read-modify-write): submit and poll for it too, a bounded number of
  // times so a long chain cannot keep the loop from its timers and sockets.
  for (unsigned chained = 0; chained < kPollChainMax; chained++) {
    if (!PollLoneCompletion(OnTick())) return;
  }
  OnTick();  // never leave an SQE unsubmitted: the loop may block next
}

void UringEngine::SetBusyPoll(uint64_t maxNs) {
  pollStats_.maxNs = maxNs;
  eventBudget_.Reset();
  completionBudget_.Reset();
  blockWaitMeasured_ = false;
  loneOpMeasured_ = false;
}

void UringEngine::PollBeforeBlock() {
  blockWaitMeasured_ = false;
  if (pollStats_.maxNs == 0 || shutDown_ || InFlight() != 0 || !overflow_.empty() || ring_.pendingSubmit() != 0) return;
  if (uv_backend_timeout(loop_) == 0) return;  // the loop will not block: work is ready
  blockWaitMeasured_ = true;
  blockWaitStartNs_ = MonotonicNs();
  uint64_t budgetNs = eventBudget_.ns();
  blockSpunNs_ = 0;
  blockIdleStartNs_ = uv_metrics_idle_time(loop_);
  if (budgetNs == 0) return;
  pollStats_.eventPolls++;
  if (SpinUntilReadable(uv_backend_fd(loop_), blockWaitStartNs_, budgetNs)) {
    pollStats_.eventPollHits++;
    blockWaitMeasured_ = false;  // caught: the budget is right as it is
    return;
  }
  blockSpunNs_ = MonotonicNs() - blockWaitStartNs_;
  blockIdleStartNs_ = uv_metrics_idle_time(loop_);
}

// The wait is the spin plus the time the loop slept in epoll (libuv's idle time), not the
// callbacks the wake-up ran: at queue depth 1 those include handling the request itself.
void UringEngine::LearnBlockedWait() {
  if (!blockWaitMeasured_) return;
  blockWaitMeasured_ = false;
  uint64_t sleptNs = uv_metrics_idle_time(loop_) - blockIdleStartNs_;
  eventBudget_.Learn(blockSpunNs_ + sleptNs, pollStats_.maxNs);
}

bool UringEngine::PollLoneCompletion(int submitted) {
  if (pollStats_.maxNs == 0 || submitted == 0 || InFlight() != 1 || ring_.pendingSubmit() != 0) return false;
  if (uv_backend_timeout(loop_) == 0) return false;  // other work is ready: do not hold it up
  loneOpMeasured_ = true;
  loneOpStartNs_ = MonotonicNs();
  uint64_t budgetNs = completionBudget_.ns();
  if (budgetNs == 0) return false;
  pollStats_.completionPolls++;
  // sched_yield is a syscall: it also runs the task work that posts the CQE (COOP_TASKRUN).
  while (!ring_.CompletionsWaiting() && MonotonicNs() - loneOpStartNs_ < budgetNs) sched_yield();
  if (!ring_.CompletionsWaiting()) return false;  // looked at once more: the last yield may have posted it
  pollStats_.completionPollHits++;
  loneOpMeasured_ = false;  // caught: the budget is right as it is
  Reap();
  return true;
}

void UringEngine::OnIdle(uv_idle_t* handle) { static_cast<UringEngine*>(handle->data)->OnTick(); }

std::unique_ptr<IoEngine> CreateUringEngine(Napi::Env env, int* errnoOut) {
  auto engine = std::make_unique<UringEngine>(env);
  int rc = engine->Init();
  *errnoOut = rc;
  if (rc != 0) return nullptr;
  return engine;
}

}  // namespace bm
