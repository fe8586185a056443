// lovasz_jax CPU kernel: Lovász weights of each pixel, in pixel order.
//
// Input: unsigned keys [..., P] made by lovasz_jax._extension.encode_keys:
//   0 marks a void pixel; otherwise key = ((bits(error) << 1) | fg) + 1, so
//   that a larger key means a larger error (and, at equal errors, fg first).
// Output: float weights [..., P] (f32 for u32 keys, f64 for u64 keys): the
//   weight that Alg. 1 of Berman et al. (CVPR 2018) gives each pixel once the
//   row is put in descending order of error, written back at the pixel's own
//   position. Void pixels get 0.
//
// Each row is sorted by a stable LSD radix sort (one byte per pass, passes
// whose byte is the same for every key are skipped), then walked once with
// integer counts; the weights use the closed form
//   foreground step: 1 / (g + fp)
//   background step: (g - tp) / ((g + fp - 1) (g + fp))   (1 when g + fp == 1)
// in double precision, so nothing cancels at any pixel count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename K, typename F>
void RowWeights(const K* keys, F* out, int64_t n, std::vector<K>& ka,
                std::vector<K>& kb, std::vector<uint32_t>& ia,
                std::vector<uint32_t>& ib) {
  constexpr int kPasses = sizeof(K);
  ka.resize(n);
  kb.resize(n);
  ia.resize(n);
  ib.resize(n);
  // Sort ascending on ~key, i.e. descending on key.
  std::vector<int64_t> hist(kPasses * 256, 0);
  int64_t g = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = keys[i];
    g += (k != 0) & ((k - 1) & 1);
    const K nk = static_cast<K>(~k);
    ka[i] = nk;
    ia[i] = static_cast<uint32_t>(i);
    for (int p = 0; p < kPasses; ++p) ++hist[p * 256 + ((nk >> (8 * p)) & 0xff)];
  }
  K* src_k = ka.data();
  K* dst_k = kb.data();
  uint32_t* src_i = ia.data();
  uint32_t* dst_i = ib.data();
  for (int p = 0; p < kPasses; ++p) {
    int64_t* h = &hist[p * 256];
    bool trivial = false;
    for (int b = 0; b < 256; ++b) {
      if (h[b] == n) trivial = true;
    }
    if (trivial) continue;
    int64_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      const int64_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    const int shift = 8 * p;
    for (int64_t i = 0; i < n; ++i) {
      const K k = src_k[i];
      const int64_t d = h[(k >> shift) & 0xff]++;
      dst_k[d] = k;
      dst_i[d] = src_i[i];
    }
    std::swap(src_k, dst_k);
    std::swap(src_i, dst_i);
  }
  int64_t tp = 0, fp = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = static_cast<K>(~src_k[i]);
    double w = 0.0;
    if (k != 0) {
      if ((k - 1) & 1) {
        ++tp;
        w = 1.0 / static_cast<double>(g + fp);
      } else {
        ++fp;
        const int64_t before = g + fp - 1;
        w = before == 0 ? 1.0
                        : static_cast<double>(g - tp) /
                              (static_cast<double>(before) *
                               static_cast<double>(g + fp));
      }
    }
    out[src_i[i]] = static_cast<F>(w);
  }
}

template <typename K, typename F>
void AllRows(const K* keys, F* out, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t workers = std::min<int64_t>(rows, hw);
  auto work = [&](int64_t first, int64_t last) {
    std::vector<K> ka, kb;
    std::vector<uint32_t> ia, ib;
    for (int64_t r = first; r < last; ++r)
      RowWeights<K, F>(keys + r * n, out + r * n, n, ka, kb, ia, ib);
  };
  if (workers <= 1 || rows * n < (1 << 16)) {
    work(0, rows);
    return;
  }
  std::vector<std::thread> threads;
  const int64_t per = (rows + workers - 1) / workers;
  for (int64_t t = 1; t < workers; ++t) {
    const int64_t first = t * per, last = std::min(rows, first + per);
    if (first < last) threads.emplace_back(work, first, last);
  }
  work(0, std::min(rows, per));
  for (auto& th : threads) th.join();
}

ffi::Error WeightsImpl(ffi::AnyBuffer keys, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = keys.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("keys must have rank >= 1");
  const int64_t n = dims.back();
  const int64_t total = static_cast<int64_t>(keys.element_count());
  if (n > static_cast<int64_t>(UINT32_MAX))
    return ffi::Error::InvalidArgument("rows longer than 2^32 pixels are not supported");
  const int64_t rows = n == 0 ? 0 : total / n;
  if (keys.element_type() == ffi::DataType::U32 &&
      out->element_type() == ffi::DataType::F32) {
    AllRows<uint32_t, float>(keys.typed_data<uint32_t>(), out->typed_data<float>(), rows, n);
  } else if (keys.element_type() == ffi::DataType::U64 &&
             out->element_type() == ffi::DataType::F64) {
    AllRows<uint64_t, double>(keys.typed_data<uint64_t>(), out->typed_data<double>(), rows, n);
  } else {
    return ffi::Error::InvalidArgument("expected u32 keys -> f32 or u64 keys -> f64");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxWeights, WeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
