// NativeError construction and argument parsing helpers.
#include <cerrno>
#include <cmath>
#include <cstring>

#include "common.h"

namespace bm {

const char* ErrnoName(int errnoValue) {
  const char* name = strerrorname_np(errnoValue);
  return name != nullptr ? name : "EUNKNOWN";
}

static std::string DescribeSyscallError(const ErrorInfo& info) {
  std::string message = info.syscall;
  if (!info.path.empty()) message += " " + info.path;
  if (info.hasRange) {
    message += " @" + std::to_string(info.offsetBytes) + "+" + std::to_string(info.lengthBytes);
  }
  message += ": ";
  message += strerror(info.errnoValue);
  return message;
}

ErrorInfo SyscallError(int errnoValue, const char* syscall, const std::string& path) {
  ErrorInfo info;
  info.code = ErrnoName(errnoValue);
  info.errnoValue = errnoValue;
  info.syscall = syscall;
  info.path = path;
  info.message = DescribeSyscallError(info);
  return info;
}

ErrorInfo SyscallError(int errnoValue, const char* syscall, const std::string& path, uint64_t offsetBytes,
                       uint64_t lengthBytes) {
  ErrorInfo info;
  info.code = ErrnoName(errnoValue);
  info.errnoValue = errnoValue;
  info.syscall = syscall;
  info.path = path;
  info.hasRange = true;
  info.offsetBytes = offsetBytes;
  info.lengthBytes = lengthBytes;
  info.message = DescribeSyscallError(info);
  return info;
}

ErrorInfo ValidationError(const char* code, const std::string& message, const std::string& path) {
  ErrorInfo info;
  info.code = code;
  info.errnoValue = 0;
  info.syscall = "";
  info.path = path;
  info.message = message;
  return info;
}

Napi::Error MakeNativeError(Napi::Env env, const ErrorInfo& info) {
  Napi::Object fields = Napi::Object::New(env);
  fields.Set("code", info.code);
  fields.Set("errno", info.errnoValue);
  fields.Set("syscall", info.syscall);
  if (!info.path.empty()) fields.Set("path", info.path);
  if (info.hasRange) {
    fields.Set("offsetBytes", static_cast<double>(info.offsetBytes));
    fields.Set("lengthBytes", static_cast<double>(info.lengthBytes));
  }
  AddonData& data = GetAddonData(env);
  if (!data.nativeErrorClass.IsEmpty()) {
    Napi::Object error = data.nativeErrorClass.New({Napi::String::New(env, info.message), fields});
    return Napi::Error(env, error);
  }
  // Only reachable if index.ts did not register its class: keep the fields anyway.
  Napi::Error error = Napi::Error::New(env, info.message);
  Napi::Object value = error.Value();
  for (const char* key : {"code", "errno", "syscall", "path", "offsetBytes", "lengthBytes"}) {
    if (fields.Has(key)) value.Set(key, fields.Get(key));
  }
  return error;
}

uint64_t ArgU64(const Napi::CallbackInfo& info, size_t index, const char* name) {
  Napi::Value value = info[index];
  if (!value.IsNumber()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  }
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0) || number > static_cast<double>(kMaxSafeInteger) || std::floor(number) != number) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a non-negative safe integer");
  }
  return static_cast<uint64_t>(number);
}

bool ArgBool(const Napi::CallbackInfo& info, size_t index, const char* name) {
  Napi::Value value = info[index];
  if (!value.IsBoolean()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a boolean");
  }
  return value.As<Napi::Boolean>().Value();
}

std::string ArgString(const Napi::CallbackInfo& info, size_t index, const char* name) {
  Napi::Value value = info[index];
  if (!value.IsString()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a string");
  }
  return value.As<Napi::String>().Utf8Value();
}

Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t index, const char* name) {
  Napi::Value value = info[index];
  if (!value.IsBuffer()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a Buffer");
  }
  return value.As<Napi::Buffer<uint8_t>>();
}

}  // namespace bm
