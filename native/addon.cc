// Module entry: per-environment state, engine selection, and the exports src/native/index.ts uses.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

#include "common.h"
#include "io_engine.h"

namespace bm {

AddonData& GetAddonData(Napi::Env env) {
  AddonData* data = env.GetInstanceData<AddonData>();
  if (data == nullptr) throw Napi::Error::New(env, "blockmirror addon is not initialised");
  return *data;
}

static Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "NativeError class must be a function");
  GetAddonData(info.Env()).nativeErrorClass = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

// setBusyPoll(maxNs): 0 turns busy polling off. Validated in src/native/index.ts.
static Napi::Value SetBusyPoll(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "maxNs must be a number");
  double maxNs = info[0].As<Napi::Number>().DoubleValue();
  if (!(maxNs >= 0 && maxNs <= 1e9)) throw Napi::RangeError::New(env, "maxNs must be 0..1e9");
  AddonData& data = GetAddonData(env);
  data.busyPollMaxNs = static_cast<uint64_t>(maxNs);
  if (data.uring) data.uring->SetBusyPoll(data.busyPollMaxNs);
  return Napi::Boolean::New(env, static_cast<bool>(data.uring));
}

static Napi::Value GetBusyPollStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonData& data = GetAddonData(env);
  BusyPollStats stats = data.uring ? data.uring->GetBusyPollStats() : BusyPollStats();
  stats.maxNs = data.busyPollMaxNs;
  Napi::Object result = Napi::Object::New(env);
  result.Set("maxNs", static_cast<double>(stats.maxNs));
  result.Set("eventPolls", static_cast<double>(stats.eventPolls));
  result.Set("eventPollHits", static_cast<double>(stats.eventPollHits));
  result.Set("completionPolls", static_cast<double>(stats.completionPolls));
  result.Set("completionPollHits", static_cast<double>(stats.completionPollHits));
  return result;
}

static void ReleaseEngines(AddonData* data) {
  // Stops io_uring (waits for the kernel to finish with every buffer) before V8 frees them.
  data->uring.reset();
  data->threadpool.reset();
}

// libuv runs our handle close callbacks after a worker's environment is torn down, which is
// also when Node dlclose()s its addons: keep this library mapped for the life of the process.
static bool PinLibraryOnce() {
  Dl_info self;
  if (dladdr(reinterpret_cast<void*>(&PinLibraryOnce), &self) == 0 || self.dli_fname == nullptr) return false;
  return dlopen(self.dli_fname, RTLD_NOW | RTLD_NODELETE) != nullptr;
}

static void PinLibrary() {
  static const bool pinned = PinLibraryOnce();  // thread-safe: workers may load us concurrently
  (void)pinned;
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  PinLibrary();
  auto* data = new AddonData();
  env.SetInstanceData(data);
  env.AddCleanupHook(ReleaseEngines, data);

  const char* engineEnv = getenv("BLOCKMIRROR_IO_ENGINE");
  if (engineEnv != nullptr && strcmp(engineEnv, "threadpool") == 0) {
    data->uringDisabledByEnv = true;
  } else {
    data->uring = CreateUringEngine(env, &data->uringSetupErrno);
  }
  const char* defaultEngine = data->uring && !data->uringDisabledByEnv ? "io_uring" : "threadpool";

  exports.Set("ioEngine", Napi::String::New(env, defaultEngine));
  exports.Set("ioUringErrno", Napi::Number::New(env, data->uringSetupErrno));
  exports.Set("setBusyPoll", Napi::Function::New(env, SetBusyPoll, "setBusyPoll"));
  exports.Set("busyPollStats", Napi::Function::New(env, GetBusyPollStats, "busyPollStats"));
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass, "setErrorClass"));
  InitAligned(env, exports);
  InitFileHandle(env, exports);
  InitDirtyBitmap(env, exports);
  InitSystem(env, exports);
  return exports;
}

}  // namespace bm

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return bm::Init(env, exports); }

NODE_API_MODULE(blockmirror, InitModule)
