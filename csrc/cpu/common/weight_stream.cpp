// The streamed-weights switch of the linear kernels (see linear.h). Compiled once, not per
// instruction set: every build reads the same switch.
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <fstream>
#include <string>

#include "cpu/linear.h"

namespace decodekit {
namespace cpu {
namespace weight_stream {
namespace {
std::atomic<bool> g_on{false};

int64_t read_llc_bytes() {
  // sysfs first (index3 is the L3 on x86), then glibc's sysconf; 32 MiB when neither knows.
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index3/size");
  std::string s;
  if (f >> s && !s.empty()) {
    int64_t v = 0;
    size_t i = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i++] - '0');
    const char unit = i < s.size() ? s[i] : '\0';
    if (unit == 'K') v <<= 10;
    if (unit == 'M') v <<= 20;
    if (v > 0) return v;
  }
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long c = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (c > 0) return c;
#endif
  return int64_t{32} << 20;
}
}  // namespace

bool on() { return g_on.load(std::memory_order_relaxed); }

bool set(bool enable) { return g_on.exchange(enable, std::memory_order_relaxed); }

int64_t last_level_cache_bytes() {
  static const int64_t bytes = read_llc_bytes();
  return bytes;
}

}  // namespace weight_stream
}  // namespace cpu
}  // namespace decodekit
