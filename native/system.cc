// Process-level helpers for the daemon: an exclusive lock file, sd_notify, dup(2), and CRC-32C for
// checksummed metadata (Node 20 has no crc32c of its own).
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "crc32c.h"

namespace bm {

// lockFile(path) -> fd. open(O_CREAT) + flock(LOCK_EX|LOCK_NB): the lock dies with the process.
static Napi::Value LockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = ArgString(info, 0, "path");
  int fd;
  do {
    fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw MakeNativeError(env, SyscallError(errno, "open", path));
  int rc;
  do {
    rc = flock(fd, LOCK_EX | LOCK_NB);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int lockErrno = errno;
    close(fd);
    ErrorInfo error = SyscallError(lockErrno, "flock", path);
    if (lockErrno == EWOULDBLOCK) {
      error.code = "BM_ERR_LOCKED";
      error.message = path + " is locked by another process (" + error.message + ")";
    }
    throw MakeNativeError(env, error);
  }
  return Napi::Number::New(env, fd);
}

// unlockFile(fd): closing the descriptor releases the flock.
static Napi::Value UnlockFile(const Napi::CallbackInfo& info) {
  uint64_t fd = ArgU64(info, 0, "fd");
  if (fd > 0x7fffffff || close(static_cast<int>(fd)) < 0) {
    throw MakeNativeError(info.Env(), SyscallError(fd > 0x7fffffff ? EBADF : errno, "close", ""));
  }
  return info.Env().Undefined();
}

// sdNotify(state) -> false when NOTIFY_SOCKET is unset, true once the datagram is sent.
static Napi::Value SdNotify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string state = ArgString(info, 0, "state");
  const char* socketPath = getenv("NOTIFY_SOCKET");
  if (socketPath == nullptr || socketPath[0] == '\0') return Napi::Boolean::New(env, false);
  size_t pathLength = strlen(socketPath);
  sockaddr_un address;
  memset(&address, 0, sizeof(address));
  address.sun_family = AF_UNIX;
  if ((socketPath[0] != '/' && socketPath[0] != '@') || pathLength >= sizeof(address.sun_path)) {
    throw MakeNativeError(env, SyscallError(EINVAL, "sendto", socketPath));
  }
  memcpy(address.sun_path, socketPath, pathLength);
  socklen_t addressLength = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + pathLength);
  if (socketPath[0] == '@') {
    address.sun_path[0] = '\0';  // abstract namespace: no trailing NUL in the length
  } else {
    addressLength += 1;
  }
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw MakeNativeError(env, SyscallError(errno, "socket", socketPath));
  ssize_t sent;
  do {
    sent = sendto(fd, state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&address), addressLength);
  } while (sent < 0 && errno == EINTR);
  int sendErrno = errno;
  close(fd);
  if (sent < 0) throw MakeNativeError(env, SyscallError(sendErrno, "sendto", socketPath));
  return Napi::Boolean::New(env, true);
}

// dupFd(fd) -> a new close-on-exec descriptor for the same open file (e.g. an accepted socket
// that JS re-wraps with reads into caller-chosen buffers; see src/net/adopt-socket.ts).
static Napi::Value DupFd(const Napi::CallbackInfo& info) {
  uint64_t fd = ArgU64(info, 0, "fd");
  if (fd > 0x7fffffff) throw MakeNativeError(info.Env(), SyscallError(EBADF, "fcntl", ""));
  int copy = fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw MakeNativeError(info.Env(), SyscallError(errno, "fcntl", ""));
  return Napi::Number::New(info.Env(), copy);
}

static Napi::Value Crc32cOf(const Napi::CallbackInfo& info) {
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(info.Env(), "data must be a Uint8Array");
  auto data = info[0].As<Napi::Uint8Array>();
  return Napi::Number::New(info.Env(), Crc32c(data.Data(), data.ByteLength()));
}

void InitSystem(Napi::Env env, Napi::Object exports) {
  exports.Set("crc32c", Napi::Function::New(env, Crc32cOf, "crc32c"));
  exports.Set("lockFile", Napi::Function::New(env, LockFile, "lockFile"));
  exports.Set("unlockFile", Napi::Function::New(env, UnlockFile, "unlockFile"));
  exports.Set("sdNotify", Napi::Function::New(env, SdNotify, "sdNotify"));
  exports.Set("dupFd", Napi::Function::New(env, DupFd, "dupFd"));
}

}  // namespace bm
