// check_probability_rows: the validation of probability rows that the Python
// wrappers of the speculative family run before the kernels (see speculative.h).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/common/isa.h"
#include "cpu/common/parallel.h"
#include "cpu/speculative/residual.h"
#include "cpu/speculative/speculative.h"

namespace decodekit {
namespace cpu {
namespace DK_ISA {

using namespace detail;

int check_probability_rows(const float* rows, int64_t nrows, int64_t V, int64_t vocab_size, bool need_mass,
                           int num_threads) {
  std::atomic<int> bad{0}, empty{0};
  parallel_rows(nrows, num_threads, Schedule::kStatic, [&](int64_t r) {
    const float* row = rows + r * V;
    VI row_bad = splati(0);
    VF mx = splat(0.0f);
    int64_t c = 0;
    for (; c + 16 <= V; c += 16) {
      const VF x = load_f32(row + c);
      row_bad |= invalid_lanes(x);
      if (c + 16 <= vocab_size) mx = select(x > mx, x, mx);
    }
    float lanes[16];
    to_array(mx, lanes);
    float m = 0.0f;
    for (int j = 0; j < 16; ++j) m = std::max(m, lanes[j]);
    bool tail_bad = false;
    for (int64_t i = c; i < V; ++i) tail_bad |= invalid_scalar(row[i]);
    for (int64_t i = (vocab_size / 16) * 16; i < vocab_size; ++i) m = std::max(m, row[i] > 0.0f ? row[i] : 0.0f);
    if (any_lane(row_bad) || tail_bad) bad.store(1, std::memory_order_relaxed);
    if (need_mass && !(m > 0.0f)) empty.store(1, std::memory_order_relaxed);
  });
  return bad.load() ? 1 : (empty.load() ? 2 : 0);
}

}  // namespace DK_ISA
}  // namespace cpu
}  // namespace decodekit
