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
