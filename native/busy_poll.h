// Adaptive busy polling for the JS thread (as qemu's AioContext polling, whose poll-max-ns the
// daemon's --busy-poll-us mirrors). On this kind of VM a sleep and wake-up of the event loop
// costs more than a 4k write to a loop device, so at queue depth 1 a short spin is cheaper than
// sleeping. Each budget adapts to how long the loop really waited: it grows (4 us, doubling up to
// the maximum) while waits stay under the maximum and drops to 0 after a longer one, so an idle
// daemon or a slow disk burns no CPU.
#pragma once

#include <cstdint>

namespace bm {

uint64_t MonotonicNs();

class AdaptiveBudget {
 public:
  uint64_t ns() const { return ns_; }
  // A wait polling did not catch took waitedNs (including the part spent polling).
  void Learn(uint64_t waitedNs, uint64_t maxNs);
  void Reset() { ns_ = 0; }

 private:
  static constexpr uint64_t kStartNs = 4000;
  uint64_t ns_ = 0;
};

// Spins until fd polls readable (true) or budgetNs has passed since startNs (false).
bool SpinUntilReadable(int fd, uint64_t startNs, uint64_t budgetNs);

struct BusyPollStats {
  uint64_t maxNs = 0;
  uint64_t eventPolls = 0;  // spins for the next event before the loop would sleep
  uint64_t eventPollHits = 0;
  uint64_t completionPolls = 0;  // spins for the completion of a lone op
  uint64_t completionPollHits = 0;
};

}  // namespace bm
