{
  "targets": [
    {
      "target_name": "blockmirror",
      "sources": [
        "native/addon.cc",
        "native/errors.cc",
        "native/aligned.cc",
        "native/uring.cc",
        "native/io_engine.cc",
        "native/busy_poll.cc",
        "native/file_handle.cc",
        "native/dirty_bitmap.cc",
        "native/crc32c.cc",
        "native/system.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS", "_GNU_SOURCE"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-std=gnu++20"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
