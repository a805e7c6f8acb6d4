// A minimal io_uring driven through raw syscalls (no liburing, which fresh hosts may lack).
// Single-threaded: only the JS thread touches the submission and completion rings.
#pragma once

#include <linux/io_uring.h>

#include <cstddef>
#include <cstdint>

namespace bm {

class Ring {
 public:
  Ring() = default;
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Returns 0 or a positive errno (ENOSYS, EPERM when io_uring_disabled, ...).
  int Setup(unsigned sqEntries, unsigned cqEntries);

  // Polls readable (epoll) while completions are waiting in the CQ.
  int fd() const { return ringFd_; }
  unsigned sqEntries() const { return sqEntries_; }
  unsigned cqEntries() const { return cqEntries_; }
  // SQEs written locally and not yet handed to the kernel with io_uring_enter.
  unsigned pendingSubmit() const { return pendingSubmit_; }
  bool SqFull() const;

  // Next free SQE (zeroed), or nullptr when the submission ring is full.
  io_uring_sqe* GetSqe();
  // Publishes prepared SQEs and enters the kernel once. Returns the number consumed or -errno.
  int Submit();
  // Blocks until at least minComplete CQEs are available (used only when tearing down).
  int WaitCompletions(unsigned minComplete);

  // True when the kernel has posted CQEs not reaped yet (a memory read, no syscall).
  bool CompletionsWaiting() const { return __atomic_load_n(cqTail_, __ATOMIC_ACQUIRE) != *cqHead_; }
  // Copies up to maxCount CQEs into out and advances the completion head.
  unsigned Reap(io_uring_cqe* out, unsigned maxCount);

 private:
  int ringFd_ = -1;
  unsigned sqEntries_ = 0;
  unsigned cqEntries_ = 0;
  unsigned pendingSubmit_ = 0;
  unsigned sqLocalTail_ = 0;

  void* sqRing_ = nullptr;
  size_t sqRingBytes_ = 0;
  void* cqRing_ = nullptr;
  size_t cqRingBytes_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  size_t sqesBytes_ = 0;

  unsigned* sqHead_ = nullptr;
  unsigned* sqTail_ = nullptr;
  unsigned sqMask_ = 0;
  unsigned* sqArray_ = nullptr;
  unsigned* cqHead_ = nullptr;
  unsigned* cqTail_ = nullptr;
  unsigned cqMask_ = 0;
  io_uring_cqe* cqes_ = nullptr;
};

}  // namespace bm
