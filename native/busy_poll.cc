#include "busy_poll.h"

#include <poll.h>
#include <time.h>

namespace bm {

uint64_t MonotonicNs() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<uint64_t>(now.tv_sec) * 1000000000ull + static_cast<uint64_t>(now.tv_nsec);
}

void AdaptiveBudget::Learn(uint64_t waitedNs, uint64_t maxNs) {
  if (waitedNs > maxNs) {
    ns_ = 0;  // polling would have been wasted: sleep until short waits come back
  } else if (ns_ < maxNs) {
    ns_ = ns_ == 0 ? kStartNs : ns_ * 2;
    if (ns_ > maxNs) ns_ = maxNs;
  }
}

bool SpinUntilReadable(int fd, uint64_t startNs, uint64_t budgetNs) {
  pollfd entry{fd, POLLIN, 0};
  do {
    if (poll(&entry, 1, 0) > 0) return true;
  } while (MonotonicNs() - startNs < budgetNs);
  return false;
}

}  // namespace bm
