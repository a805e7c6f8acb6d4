// Shared declarations of the blockmirror addon: per-environment state, error helpers and
// argument parsing. Everything here runs on the JS thread unless a comment says otherwise.
#pragma once

#include <napi.h>

#include <cstdint>
#include <memory>
#include <string>

namespace bm {

class IoEngine;

// Largest integer a JS number represents exactly; offsets and lengths above it are refused.
constexpr uint64_t kMaxSafeInteger = (uint64_t{1} << 53) - 1;
// One read or write moves at most this many bytes (io_uring lengths are 32-bit; pools stop at 32 MiB).
constexpr uint64_t kMaxIoBytes = uint64_t{1} << 30;

// State owned by one Node environment (main thread or a worker).
struct AddonData {
  Napi::FunctionReference nativeErrorClass;  // handed over once by src/native/index.ts
  Napi::FunctionReference fileHandleClass;
  Napi::FunctionReference dirtyBitmapClass;
  std::unique_ptr<IoEngine> uring;  // null when io_uring is unavailable or disabled
  int uringSetupErrno = 0;          // why io_uring is unavailable (0 when available)
  bool uringDisabledByEnv = false;
  uint64_t busyPollMaxNs = 0;  // setBusyPoll: applies to the io_uring engine, now or when created
  std::unique_ptr<IoEngine> threadpool;
};

AddonData& GetAddonData(Napi::Env env);

// Fields of a NativeError (see src/native/types.ts NativeErrorFields).
struct ErrorInfo {
  std::string code;  // errno name or BM_ERR_*
  int errnoValue = 0;
  std::string syscall;
  std::string path;
  bool hasRange = false;
  uint64_t offsetBytes = 0;
  uint64_t lengthBytes = 0;
  std::string message;  // when empty, built from syscall, path, range and strerror
};

// Builds an instance of the JS NativeError class (falls back to a plain Error with the fields).
Napi::Error MakeNativeError(Napi::Env env, const ErrorInfo& info);
// Error for a failed syscall: code = errno name, message "syscall path @offset+length: strerror".
ErrorInfo SyscallError(int errnoValue, const char* syscall, const std::string& path);
ErrorInfo SyscallError(int errnoValue, const char* syscall, const std::string& path, uint64_t offsetBytes,
                       uint64_t lengthBytes);
// Validation error detected before any syscall.
ErrorInfo ValidationError(const char* code, const std::string& message, const std::string& path = "");
const char* ErrnoName(int errnoValue);

// Argument parsing: throws TypeError/RangeError (as JS exceptions) on bad input.
uint64_t ArgU64(const Napi::CallbackInfo& info, size_t index, const char* name);
bool ArgBool(const Napi::CallbackInfo& info, size_t index, const char* name);
std::string ArgString(const Napi::CallbackInfo& info, size_t index, const char* name);
Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t index, const char* name);

// Module parts register their exports here.
void InitAligned(Napi::Env env, Napi::Object exports);
void InitFileHandle(Napi::Env env, Napi::Object exports);
void InitDirtyBitmap(Napi::Env env, Napi::Object exports);
void InitSystem(Napi::Env env, Napi::Object exports);

}  // namespace bm
