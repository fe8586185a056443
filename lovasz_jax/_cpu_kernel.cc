// lovasz_jax CPU kernel: Lovász weights of each pixel, in pixel order.
//
// Input: unsigned keys [..., P] made by lovasz_jax._extension.encode_keys:
//   0 marks a void pixel; otherwise key = ((bits(error) << 1) | fg) + 1, so
//   that a larger key means a larger error (and, at equal errors, fg first).
// Outputs (f32 for u32 keys, f64 for u64 keys):
//   weights [..., P]: the weight that Alg. 1 of Berman et al. (CVPR 2018)
//     gives each pixel once the row is put in descending order of error,
//     written back at the pixel's own position; void pixels get 0.
//   losses [...]: each row's Lovász extension, sum(error * weight), with the
//     errors decoded from the keys and the sum accumulated in double.
//
// Each row is sorted by a stable LSD radix sort (u32 keys: key and pixel
// index packed in one u64, 11-bit digits, 3 passes; u64 keys: 8-bit digits;
// passes whose digit is the same for every key are skipped), then walked once
// with integer counts; the weights use the closed form
//   foreground step: 1 / (g + fp)
//   background step: (g - tp) / ((g + fp - 1) (g + fp))   (1 when g + fp == 1)
// in double precision, so nothing cancels at any pixel count.
//
// Histogram mode is two more entry points, so that the counts of a row split
// over devices can be summed between them (lovasz_jax._distribute):
//   lovasz_jax_counts: keys [..., P] made by encode_bins (((bin << 1) | fg)
//     + 1, 0 for void) -> counts [..., 2K + 1] (s32), each slot's pixels;
//   lovasz_jax_lookup: (omega [..., 2K + 1], keys [..., P]) -> each pixel's
//     slot weight omega[..., key] (f32 or f64).
//   lovasz_jax_slots: counts -> (omega [..., 2K + 1], row losses), the slot
//     weights of lovasz_jax._extension.slot_weights (its XLA version);
//   lovasz_jax_encode_counts and lovasz_jax_grad_table: the softmax losses'
//     two passes (below) in histogram mode: the first counts each row's
//     keys per slot as it computes them, the second recomputes them and
//     reads each pixel's weight as omega[..., key], so that neither keys
//     nor per-pixel weights are ever stored.
//
// Threads: rows are independent. Once a call has at least 2^16 keys, its rows
// are shared out in chunks between the calling thread and tasks scheduled on
// XLA's intra-op thread pool (the ffi::ThreadPool context), so no thread is
// created per call. Every participant claims chunks from one atomic counter,
// and the calling thread waits only for chunks that a running task has
// claimed, never for a task to start: that cannot deadlock, even when the
// caller is itself a pool thread and the pool is busy. A task that starts
// after the last chunk was claimed returns at once.
//
// Built with the package (setup.py) against the XLA FFI headers of the
// lowest supported jaxlib: an XLA runtime accepts handlers built against its
// own FFI API version or an older one, not a newer one.
// LovaszJaxFfiApiVersion reports the version it was built against, so that
// lovasz_jax checks it before registering the handler.
//
// Entry points (at the end of the file): LovaszJaxWeights, LovaszJaxCounts,
// LovaszJaxLookup, LovaszJaxEncode, LovaszJaxGrad, LovaszJaxSlots,
// LovaszJaxGradTable, LovaszJaxEncodeCounts and LovaszJaxClassCounts, targets
// "lovasz_jax_weights",
// "lovasz_jax_counts", "lovasz_jax_lookup", "lovasz_jax_encode",
// "lovasz_jax_grad", "lovasz_jax_slots", "lovasz_jax_grad_table",
// "lovasz_jax_encode_counts" and "lovasz_jax_class_counts".
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define LOVASZ_JAX_X86_CLONES 1
#include <immintrin.h>
#endif

#ifdef LOVASZ_JAX_SPAWN_THREADS
#include <thread>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Stable LSD radix sort of items by the bits [lo, lo + bits) of key(item).
template <int kDigit, typename T, typename KeyFn>
T* RadixSort(T* a, T* b, int64_t n, int lo, int bits, KeyFn key) {
  constexpr int kBuckets = 1 << kDigit;
  const int passes = (bits + kDigit - 1) / kDigit;
  std::vector<int64_t> hist(static_cast<size_t>(passes) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = key(a[i]) >> lo;
    for (int p = 0; p < passes; ++p)
      ++hist[p * kBuckets + ((k >> (kDigit * p)) & (kBuckets - 1))];
  }
  for (int p = 0; p < passes; ++p) {
    int64_t* h = &hist[static_cast<size_t>(p) * kBuckets];
    bool trivial = false;
    int64_t sum = 0;
    for (int d = 0; d < kBuckets; ++d) {
      const int64_t c = h[d];
      trivial |= c == n;
      h[d] = sum;
      sum += c;
    }
    if (trivial) continue;
    const int shift = lo + kDigit * p;
    for (int64_t i = 0; i < n; ++i) {
      const T item = a[i];
      b[h[(key(item) >> shift) & (kBuckets - 1)]++] = item;
    }
    std::swap(a, b);
  }
  return a;
}

// Walks one row in descending key order; returns the row's loss.
// sorted_key(i) and pixel(i) give the i-th key and its pixel.
template <typename K, typename F, typename SortedKey, typename Pixel>
double Walk(int64_t n, int64_t g, SortedKey sorted_key, Pixel pixel, F* out) {
  using Bits = std::conditional_t<sizeof(K) == 4, uint32_t, uint64_t>;
  using Real = std::conditional_t<sizeof(K) == 4, float, double>;
  int64_t tp = 0, fp = 0;
  double loss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = sorted_key(i);
    double w = 0.0;
    if (k != 0) {
      const Bits bits = static_cast<Bits>((k - 1) >> 1);
      Real e;
      std::memcpy(&e, &bits, sizeof(e));
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
      loss += static_cast<double>(e) * w;
    }
    out[pixel(i)] = static_cast<F>(w);
  }
  return loss;
}

struct Scratch {
  std::vector<uint64_t> a, b;
  int64_t participant = -1;  // EncodeCountPixels: whose count table
};

// Only the head of a row needs ordering. In descending order, once every
// foreground pixel has been seen (tp == g), each background pixel after it
// weighs (g - tp) / (...) = 0 exactly. So the pixels whose key is below the
// row's smallest foreground key (all background: a background key is even
// smaller than a foreground key of the same error) get weight 0 and add 0 to
// the loss, and only the others, the row's head, are sorted and walked. A
// row with no foreground pixel weighs only its first largest key (1), so its
// head is the pixels of its largest key. The results are the same, bit for
// bit, as for the whole row sorted; how many pixels that saves depends on
// the predictions (with confident ones the head is most of the row).
template <typename K>
struct Head {
  int64_t g = 0;     // foreground pixels
  K threshold = 0;   // keys >= threshold form the head (0: the row is void)
};

// One pass over the keys, written so that it vectorises (with SSE2): with
// j = key - 1, a foreground pixel has j odd, and a void pixel j = ~0 (odd
// too, and larger than any key's j, so it never lowers the minimum).
template <typename K>
Head<K> FindHead(const K* keys, int64_t n) {
  K min_j = ~K(0), max_key = 0, odd = 0, voids = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = keys[i];
    const K j = k - 1;
    min_j = std::min(min_j, static_cast<K>(j | (K(0) - (~j & 1))));
    max_key = std::max(max_key, k);
    odd += j & 1;
    voids += k == 0;
  }
  Head<K> h;
  h.g = static_cast<int64_t>(odd - voids);
  h.threshold = h.g > 0 ? static_cast<K>(min_j + 1) : max_key;
  return h;
}

// u32 keys: the head's items (~key << 32 | pixel) are packed, then sorted
// ascending by a stable LSD radix sort of the key half (11-bit digits, 3
// passes, a pass whose digit is the same for every item skipped), then
// walked.
double Row32(const uint32_t* keys, float* out, int64_t n, Scratch& s) {
  const Head<uint32_t> h = FindHead(keys, n);
  std::fill(out, out + n, 0.0f);
  if (h.threshold == 0) return 0.0;
  s.a.resize(n);
  s.b.resize(n);
  uint64_t* a = s.a.data();
  int64_t m = 0;
  // Blocks of 8 keys with none in the head (most of them, when the head is
  // small) are skipped after one vectorised test.
  const uint32_t t = h.threshold;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint32_t any = 0;
    for (int u = 0; u < 8; ++u) any |= keys[i + u] >= t;
    if (!any) continue;
    for (int64_t u = i; u < i + 8; ++u) {
      a[m] = (static_cast<uint64_t>(~keys[u]) << 32) | static_cast<uint64_t>(u);
      m += keys[u] >= t;
    }
  }
  for (; i < n; ++i) {
    a[m] = (static_cast<uint64_t>(~keys[i]) << 32) | static_cast<uint64_t>(i);
    m += keys[i] >= t;
  }
  const uint64_t* sorted = RadixSort<11>(a, s.b.data(), m, 32, 32,
                                         [](uint64_t x) { return x; });
  return Walk<uint32_t, float>(
      m, h.g, [&](int64_t i) { return static_cast<uint32_t>(~(sorted[i] >> 32)); },
      [&](int64_t i) { return sorted[i] & 0xffffffffu; }, out);
}

// u64 keys (float64 errors): the head's pixel indices sorted by ~key, 8-bit
// digits.
double Row64(const uint64_t* keys, double* out, int64_t n, Scratch& s) {
  const Head<uint64_t> h = FindHead(keys, n);
  std::fill(out, out + n, 0.0);
  if (h.threshold == 0) return 0.0;
  s.a.resize(n);
  s.b.resize(n);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    s.a[m] = static_cast<uint64_t>(i);
    m += keys[i] >= h.threshold;
  }
  const uint64_t* sorted = RadixSort<8>(s.a.data(), s.b.data(), m, 0, 64,
                                        [&](uint64_t i) { return ~keys[i]; });
  return Walk<uint64_t, double>(
      m, h.g, [&](int64_t i) { return keys[sorted[i]]; },
      [&](int64_t i) { return sorted[i]; }, out);
}

// Calls work(first, last, scratch) on chunks of rows [0, rows): on the
// calling thread, and on up to min(pool.num_threads(), max_threads) - 1 pool
// tasks when the call has at least kParallelKeys keys. Each participant has
// one Scratch.
constexpr int64_t kParallelKeys = int64_t{1} << 16;
// A chunk holds at least this many keys, so claiming one costs little.
constexpr int64_t kChunkKeys = int64_t{1} << 14;

#ifndef LOVASZ_JAX_SPAWN_THREADS

template <typename Work>
struct SharedRows {
  SharedRows(int64_t rows, int64_t chunk, Work work)
      : rows(rows), chunk(chunk), work(std::move(work)) {}

  // Claims and runs chunks until none is left.
  void Drain() {
    Scratch scratch;
    for (;;) {
      const int64_t first = next.fetch_add(chunk);
      if (first >= rows) return;
      const int64_t last = std::min(rows, first + chunk);
      work(first, last, scratch);
      if (done.fetch_add(last - first) + (last - first) == rows) {
        { std::lock_guard<std::mutex> lock(mu); }
        finished.notify_all();
      }
    }
  }

  const int64_t rows, chunk;
  Work work;  // used only while a chunk is unfinished
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable finished;
};

template <typename Work>
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t n, Work work,
                  int64_t max_threads = INT64_MAX) {
  const int64_t threads =
      rows * n < kParallelKeys ? 1 : std::min<int64_t>(pool.num_threads(), max_threads);
  const int64_t chunk = std::max<int64_t>(
      std::min<int64_t>(kChunkKeys / std::max<int64_t>(n, 1) + 1,
                        rows / std::max<int64_t>(threads, 1)), 1);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int64_t tasks = std::min(threads, chunks) - 1;
  if (tasks <= 0) {
    Scratch scratch;
    work(0, rows, scratch);
    return;
  }
  // Shared with the tasks, which may start after this call returned.
  auto shared = std::make_shared<SharedRows<Work>>(rows, chunk, std::move(work));
  for (int64_t t = 0; t < tasks; ++t) pool.Schedule([shared] { shared->Drain(); });
  shared->Drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->finished.wait(lock, [&] { return shared->done.load() == rows; });
}

#else  // LOVASZ_JAX_SPAWN_THREADS: the former per-call threads, kept only so
       // that benchmarks/bench.py can time both in one run.

template <typename Work>
void ParallelRows(ffi::ThreadPool& pool, int64_t rows, int64_t n, Work work,
                  int64_t max_threads = INT64_MAX) {
  (void)pool;
  const int64_t hw = std::max<int64_t>(
      1, std::min<int64_t>(std::thread::hardware_concurrency(), max_threads));
  const int64_t workers = std::min<int64_t>(rows, hw);
  auto run = [&](int64_t first, int64_t last) {
    Scratch scratch;
    work(first, last, scratch);
  };
  if (workers <= 1 || rows * n < kParallelKeys) {
    run(0, rows);
    return;
  }
  std::vector<std::thread> threads;
  const int64_t per = (rows + workers - 1) / workers;
  for (int64_t t = 1; t < workers; ++t) {
    const int64_t first = t * per, last = std::min(rows, first + per);
    if (first < last) threads.emplace_back(run, first, last);
  }
  run(0, std::min(rows, per));
  for (auto& th : threads) th.join();
}

#endif  // LOVASZ_JAX_SPAWN_THREADS

// Every row of keys [rows, n]: weights into out, each row's loss into losses.
template <typename K, typename F, typename RowFn>
void AllRows(ffi::ThreadPool& pool, const K* keys, F* out, F* losses,
             int64_t rows, int64_t n, RowFn row) {
  if (rows == 0) return;
  ParallelRows(pool, rows, n, [=](int64_t first, int64_t last, Scratch& s) {
    for (int64_t r = first; r < last; ++r)
      losses[r] = static_cast<F>(n == 0 ? 0.0 : row(keys + r * n, out + r * n, n, s));
  });
}

//===----------------------------------------------------------------------===//
// Entry point: lovasz_jax_weights (keys -> weights, row losses)
//===----------------------------------------------------------------------===//

ffi::Error WeightsImpl(ffi::ThreadPool pool, ffi::AnyBuffer keys,
                       ffi::Result<ffi::AnyBuffer> weights,
                       ffi::Result<ffi::AnyBuffer> losses, int64_t num_bins) {
  const auto dims = keys.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("keys must have rank >= 1");
  const int64_t n = dims.back();
  if (n > static_cast<int64_t>(UINT32_MAX))
    return ffi::Error::InvalidArgument("rows longer than 2^32 pixels are not supported");
  const int64_t rows = static_cast<int64_t>(losses->element_count());
  // Histogram mode has its own entry points; num_bins stays in the interface.
  if (num_bins != 0)
    return ffi::Error::InvalidArgument("lovasz_jax_weights takes num_bins = 0");
  if (keys.element_type() == ffi::DataType::U32 &&
      weights->element_type() == ffi::DataType::F32) {
    AllRows(pool, keys.typed_data<uint32_t>(), weights->typed_data<float>(),
            losses->typed_data<float>(), rows, n, Row32);
  } else if (keys.element_type() == ffi::DataType::U64 &&
             weights->element_type() == ffi::DataType::F64) {
    AllRows(pool, keys.typed_data<uint64_t>(), weights->typed_data<double>(),
            losses->typed_data<double>(), rows, n, Row64);
  } else {
    return ffi::Error::InvalidArgument("expected u32 keys -> f32 or u64 keys -> f64");
  }
  return ffi::Error::Success();
}

//===----------------------------------------------------------------------===//
// Entry points: lovasz_jax_counts and lovasz_jax_lookup (histogram mode)
//===----------------------------------------------------------------------===//

// counts[r, s]: how many pixels of row r are in slot s (slot 0: void).
template <typename K>
void CountRows(ffi::ThreadPool& pool, const K* keys, int32_t* counts,
               int64_t rows, int64_t n, int64_t slots) {
  ParallelRows(pool, rows, n, [=](int64_t first, int64_t last, Scratch&) {
    for (int64_t r = first; r < last; ++r) {
      const K* k = keys + r * n;
      int32_t* c = counts + r * slots;
      std::fill(c, c + slots, 0);
      for (int64_t i = 0; i < n; ++i)
        ++c[std::min<uint64_t>(static_cast<uint64_t>(k[i]), slots - 1)];
    }
  });
}

ffi::Error CountsImpl(ffi::ThreadPool pool, ffi::AnyBuffer keys,
                      ffi::Result<ffi::Buffer<ffi::S32>> counts, int64_t num_bins) {
  const auto dims = keys.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("keys must have rank >= 1");
  const int64_t n = dims.back();
  if (n > static_cast<int64_t>(INT32_MAX))
    return ffi::Error::InvalidArgument("rows longer than 2^31 - 1 pixels are not supported");
  if (num_bins < 1 || num_bins > (int64_t{1} << 30))
    return ffi::Error::InvalidArgument("num_bins must be in [1, 2^30]");
  const int64_t slots = 2 * num_bins + 1;
  const int64_t rows = static_cast<int64_t>(counts->element_count()) / slots;
  if (keys.element_type() == ffi::DataType::U32)
    CountRows(pool, keys.typed_data<uint32_t>(), counts->typed_data(), rows, n, slots);
  else if (keys.element_type() == ffi::DataType::U64)
    CountRows(pool, keys.typed_data<uint64_t>(), counts->typed_data(), rows, n, slots);
  else
    return ffi::Error::InvalidArgument("expected u32 or u64 keys");
  return ffi::Error::Success();
}

// out[r, i] = omega[r, keys[r, i]]: each pixel's slot weight.
template <typename K, typename F>
void LookupRows(ffi::ThreadPool& pool, const K* keys, const F* omega, F* out,
                int64_t rows, int64_t n, int64_t slots) {
  ParallelRows(pool, rows, n, [=](int64_t first, int64_t last, Scratch&) {
    for (int64_t r = first; r < last; ++r) {
      const K* k = keys + r * n;
      const F* w = omega + r * slots;
      F* o = out + r * n;
      for (int64_t i = 0; i < n; ++i)
        o[i] = w[std::min<uint64_t>(static_cast<uint64_t>(k[i]), slots - 1)];
    }
  });
}

ffi::Error LookupImpl(ffi::ThreadPool pool, ffi::AnyBuffer omega, ffi::AnyBuffer keys,
                      ffi::Result<ffi::AnyBuffer> out) {
  const auto kd = keys.dimensions(), od = omega.dimensions();
  if (kd.size() == 0 || od.size() != kd.size() || od.back() == 0)
    return ffi::Error::InvalidArgument(
        "omega and keys must have the same rank >= 1, and omega slots");
  const int64_t n = kd.back(), slots = od.back();
  const int64_t rows = static_cast<int64_t>(omega.element_count()) / slots;
  const bool k32 = keys.element_type() == ffi::DataType::U32;
  const bool k64 = keys.element_type() == ffi::DataType::U64;
  if (omega.element_type() == ffi::DataType::F32 && (k32 || k64)) {
    if (k32)
      LookupRows(pool, keys.typed_data<uint32_t>(), omega.typed_data<float>(),
                 out->typed_data<float>(), rows, n, slots);
    else
      LookupRows(pool, keys.typed_data<uint64_t>(), omega.typed_data<float>(),
                 out->typed_data<float>(), rows, n, slots);
  } else if (omega.element_type() == ffi::DataType::F64 && (k32 || k64)) {
    if (k32)
      LookupRows(pool, keys.typed_data<uint32_t>(), omega.typed_data<double>(),
                 out->typed_data<double>(), rows, n, slots);
    else
      LookupRows(pool, keys.typed_data<uint64_t>(), omega.typed_data<double>(),
                 out->typed_data<double>(), rows, n, slots);
  } else {
    return ffi::Error::InvalidArgument("expected f32/f64 omega and u32/u64 keys");
  }
  return ffi::Error::Success();
}

// lovasz_jax_slots: counts [..., 2K + 1] (s32) -> (omega [..., 2K + 1],
// losses [...]), as lovasz_jax._extension.slot_weights computes them in XLA:
// bins in descending order, foreground slot (2b + 2) before background slot
// (2b + 1); a foreground slot weighs 1 / (g + fp), a background slot of n
// pixels (g - tp) / ((g + fp) (g + fp + n)) (1 / n when g + fp == 0), with
// tp and fp counted before it (an empty slot: as if n were 1); slot 0 weighs
// 0. The row's
// loss sums each slot's pixels times its weight times its bin's centre
// (b + 1/2) / K. Double precision throughout, rounded at the end.
template <typename F>
void SlotRows(ffi::ThreadPool& pool, const int32_t* counts, F* omega, F* losses,
              int64_t rows, int64_t num_bins) {
  const int64_t slots = 2 * num_bins + 1;
  ParallelRows(pool, rows, slots, [=](int64_t first, int64_t last, Scratch&) {
    for (int64_t r = first; r < last; ++r) {
      const int32_t* n = counts + r * slots;
      F* w = omega + r * slots;
      int64_t g = 0;
      for (int64_t b = 0; b < num_bins; ++b) g += n[2 * b + 2];
      int64_t tp = 0, fp = 0;
      double loss = 0;
      w[0] = 0;
      for (int64_t b = num_bins - 1; b >= 0; --b) {
        const int64_t n_fg = n[2 * b + 2], n_bg = n[2 * b + 1];
        const double u = static_cast<double>(g + fp);
        const double w_fg = 1.0 / std::max(u, 1.0);
        tp += n_fg;
        const double nb = static_cast<double>(n_bg);
        const double w_bg = u == 0 ? 1.0 / std::max(nb, 1.0)
                                   : static_cast<double>(g - tp) / (u * (u + nb));
        fp += n_bg;
        w[2 * b + 2] = static_cast<F>(w_fg);
        w[2 * b + 1] = static_cast<F>(w_bg);
        loss += (static_cast<double>(b) + 0.5) / static_cast<double>(num_bins) *
                (static_cast<double>(n_fg) * w_fg + nb * w_bg);
      }
      losses[r] = static_cast<F>(loss);
    }
  });
}

ffi::Error SlotsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> counts,
                     ffi::Result<ffi::AnyBuffer> omega,
                     ffi::Result<ffi::AnyBuffer> losses, int64_t num_bins) {
  if (num_bins < 1 || num_bins > (int64_t{1} << 30))
    return ffi::Error::InvalidArgument("num_bins must be in [1, 2^30]");
  const int64_t slots = 2 * num_bins + 1;
  const auto dims = counts.dimensions();
  if (dims.size() == 0 || dims.back() != slots ||
      omega->element_count() != counts.element_count())
    return ffi::Error::InvalidArgument("counts and omega must be [..., 2 num_bins + 1]");
  const int64_t rows = static_cast<int64_t>(counts.element_count()) / slots;
  if (static_cast<int64_t>(losses->element_count()) != rows)
    return ffi::Error::InvalidArgument("losses must be [...]");
  const auto t = omega->element_type();
  if (losses->element_type() != t)
    return ffi::Error::InvalidArgument("omega and losses must share a dtype");
  if (t == ffi::DataType::F32)
    SlotRows(pool, counts.typed_data(), omega->typed_data<float>(),
             losses->typed_data<float>(), rows, num_bins);
  else if (t == ffi::DataType::F64)
    SlotRows(pool, counts.typed_data(), omega->typed_data<double>(),
             losses->typed_data<double>(), rows, num_bins);
  else
    return ffi::Error::InvalidArgument("expected f32 or f64 omega");
  return ffi::Error::Success();
}

//===----------------------------------------------------------------------===//
// Entry points: lovasz_jax_encode and lovasz_jax_grad (class rows from pixels)
//===----------------------------------------------------------------------===//
//
// The softmax losses hold logits pixel-major ([..., P, C]), and the rows are
// class-major ([..., C, P]). These two passes move between the two layouts
// while they compute (the softmax too), so that neither the probabilities
// nor a transpose of C x P values is ever materialised:
//   lovasz_jax_encode: (x [..., P, C], labels [..., P] s32) -> (keys
//     [..., C, P], lse [..., P], bad [..., P] s32). bad is 1 at valid pixels
//     whose x are out of their domain (logits not finite, or probabilities
//     outside [0, 1] or NaN), else 0. With softmax = 1, x are logits: p =
//     exp(x - lse), lse the log-sum-exp over the classes; with softmax = 0,
//     x are the probabilities (lse is 0). The key of pixel i in row c is
//     encode_keys (num_bins == 0) or encode_bins (num_bins == K) of the
//     error |[label_i == c] - p_ic|, as lovasz_jax._extension.encode_rows
//     computes it in XLA; label kVoidLabel marks a void pixel (key 0, and
//     its logits are never read).
//   lovasz_jax_grad: (x [..., P, C], lse [..., P], labels [..., P],
//     weights [..., C, P], ct [..., C]) -> [..., P, C]: the gradient of
//     sum_c ct_c loss_c with respect to the probabilities (d_p = ct_c * w,
//     negated where label_i == c), or with softmax = 1 with respect to the
//     logits x, whose probabilities p = exp(x - lse) it recomputes:
//     p * (d_p - sum_k d_p_k p_k). Void pixels get d_p, which is 0 (or NaN
//     with a NaN cotangent), whatever their logits.
// Both are independent per pixel; blocks of pixels are shared out like rows.
// Within a block, tiles of kTile pixels are copied class-major into small
// buffers (in L1), so that every arithmetic loop runs over contiguous
// values and vectorises (exp and log included, see ExpNonPositive and
// LogPositive).

constexpr int32_t kVoidLabel = INT32_MIN;
constexpr int64_t kPixelBlock = 4096;
constexpr int64_t kTile = 64;

// The float32 passes are compiled twice on x86-64: for the baseline, and
// for x86-64-v3 (AVX2 and FMA: eight lanes where the baseline has four,
// 8 x 8 block transposes between the layouts, gathers), chosen at run time
// (the softmax of a tile by an ifunc, target_clones; the passes by
// HasV3). The work is the same, bit for bit up to FMA contraction, which
// changes the last bit of some products.
#ifdef LOVASZ_JAX_X86_CLONES
#define LOVASZ_JAX_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LOVASZ_JAX_CLONES
#endif
#if defined(__GNUC__)
#define LOVASZ_JAX_INLINE inline __attribute__((always_inline))
#else
#define LOVASZ_JAX_INLINE inline
#endif

template <typename F, typename K>
LOVASZ_JAX_INLINE K ErrorKey(F e, bool fg) {
  using Bits = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  e = std::isnan(e) ? std::numeric_limits<F>::infinity() : e;
  Bits bits;
  std::memcpy(&bits, &e, sizeof(bits));
  return static_cast<K>(((static_cast<K>(bits) << 1) | K(fg)) + 1);
}

// The histogram key of probability p in row c of a pixel labelled l:
// ((bin << 1) | fg) + 1 with bin = floor(e * K) of the error e = |fg - p|,
// clipped to [0, K) (e >= 0, so the floor is a truncation, and NaN, inf and
// e >= 1 all land in the top bin: no comparison with NaN holds); 0 if the
// pixel is void. scale = K and top = K - 1 as F. I is the lane type (32-bit
// for float32, so that the loops vectorise). The encode and gradient passes
// both call this on the same probabilities, so they get the same keys.
template <typename F, typename K, typename I>
LOVASZ_JAX_INLINE K HistogramKey(F p, I l, I c, F scale, F top, int64_t num_bins) {
  const bool fg = l == c;
  const F e = std::fabs((fg ? F(1) : F(0)) - p);
  const F sc = e * scale;
  const K bin = sc < top ? static_cast<K>(static_cast<I>(sc)) : static_cast<K>(num_bins - 1);
  const K key = ((bin << 1) | K(fg)) + 1;
  return l == kVoidLabel ? K(0) : key;
}

// exp(x) for x <= 0 (a log-probability), in a form that vectorises: x is
// clamped to [-87, 0] (exp(-87) is about 1.6e-38: smaller probabilities weigh
// nothing next to 1), split as n ln2 + r with |r| <= ln2 / 2 (n rounded to
// nearest by the 1.5 * 2^23 trick), e^r from its degree-7 Taylor polynomial
// (relative error under 2e-7 on that interval), and 2^n put into the
// exponent bits.
LOVASZ_JAX_INLINE float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 0.0f ? 0.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
// The same for float64, with a degree-13 polynomial (relative error under
// 1e-17 on |r| <= ln2 / 2). (Not libm's exp, whose symbol version would need
// a newer glibc than the wheel's manylinux policy allows.)
inline double ExpNonPositive(double x) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 0.0 ? 0.0 : x;
  const double n = (x * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  // sum_{k <= 13} r^k / k!, by Horner: 1 + r (1 + r/2 (1 + r/3 (...))).
  double p = 1.0;
  for (int k = 13; k >= 1; --k) p = 1.0 + p * r / k;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log(s) for s in [1, 2^126) (a sum of exponentials, the largest of them 1),
// in a form that vectorises: s = m 2^e with m in [sqrt(1/2), sqrt(2)), and
// log(m) = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172, from the series
// 2 (t + t^3/3 + ... + t^9/9) (relative error under 1e-8).
LOVASZ_JAX_INLINE float LogPositive(float s) {
  int32_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  // The exponent as if the mantissa were in [sqrt(1/2), sqrt(2)).
  const int32_t e = ((bits - 0x3f3504f3) >> 23);
  const int32_t mbits = bits - (e << 23);
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  float q = 1.0f / 9.0f;
  q = q * t2 + 1.0f / 7.0f;
  q = q * t2 + 1.0f / 5.0f;
  q = q * t2 + 1.0f / 3.0f;
  q = q * t2 + 1.0f;
  return static_cast<float>(e) * 0.693147180559945309f + 2.0f * t * q;
}
inline double LogPositive(double s) {
  int64_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  const int64_t e = (bits - 0x3fe6a09e667f3bcdLL) >> 52;
  const int64_t mbits = bits - (e << 52);
  double m;
  std::memcpy(&m, &mbits, sizeof(m));
  const double t = (m - 1.0) / (m + 1.0);
  const double t2 = t * t;
  double q = 1.0 / 23.0;  // 2 atanh(t) = 2 (t + t^3/3 + ... + t^23/23)
  for (int k = 21; k >= 1; k -= 2) q = q * t2 + 1.0 / k;
  return static_cast<double>(e) * 0.69314718055994530942 + 2.0 * t * q;
}

// Scratch of one thread's tiles: three of kTile x C values, and three of
// kTile.
template <typename F>
struct Tiles {
  explicit Tiles(int64_t C) : v(static_cast<size_t>(3 * kTile * C + 3 * kTile)) {}
  std::vector<F> v;
};

// Calls block(g, i0, i1, tiles) on every block [i0, i1) of kPixelBlock
// pixels of every group g, shared out like rows; tiles: one thread's
// Tiles<F>(C) scratch.
template <typename F, typename Block>
void ForEachPixelBlock(ffi::ThreadPool& pool, int64_t groups, int64_t P, int64_t C,
                       Block block) {
  const int64_t blocks = (P + kPixelBlock - 1) / kPixelBlock;
  if (groups * blocks == 0) return;
  ParallelRows(pool, groups * blocks, kPixelBlock * C,
               [=](int64_t first, int64_t last, Scratch&) {
    Tiles<F> tiles(C);
    for (int64_t u = first; u < last; ++u) {
      const int64_t g = u / blocks, i0 = (u % blocks) * kPixelBlock;
      block(g, i0, std::min(P, i0 + kPixelBlock), tiles.v.data());
    }
  });
}

#ifdef LOVASZ_JAX_X86_CLONES
// In-register transpose of eight rows of eight floats.
__attribute__((target("arch=x86-64-v3"))) inline void Transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Moves pixels [0, n8) (a multiple of 8) of a tile between pixel-major rows
// of C values (stride C) and class-major rows of kTile (stride kTile), by
// 8 x 8 blocks. to_tile: from x into the tile. The last C % 8 classes are
// blocks too, read with masked loads. Written back, each pixel's block of
// them is stored whole, its last lanes spilling into the following pixels'
// values, which their own stores (all later) then overwrite, unless the
// spill would leave the eight pixels: then it is a masked store, so that
// nothing outside the eight pixels' values is ever written.
__attribute__((target("arch=x86-64-v3"))) void TransposeBlocks(float* x, int64_t C,
                                                               int64_t n8, float* tile,
                                                               bool to_tile) {
  const int64_t c8 = C & ~int64_t{7}, rest = C - c8;
  alignas(32) static constexpr int32_t kLanes[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i mask = _mm256_cmpgt_epi32(
      _mm256_set1_epi32(static_cast<int32_t>(rest)),
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kLanes)));
  __m256 r[8];
  for (int64_t t = 0; t < n8; t += 8) {
    if (rest && to_tile) {
      for (int j = 0; j < 8; ++j) r[j] = _mm256_maskload_ps(x + (t + j) * C + c8, mask);
      Transpose8(r);
      for (int64_t j = 0; j < rest; ++j) _mm256_storeu_ps(tile + (c8 + j) * kTile + t, r[j]);
    } else if (rest) {
      for (int j = 0; j < 8; ++j)
        r[j] = j < rest ? _mm256_loadu_ps(tile + (c8 + j) * kTile + t) : _mm256_setzero_ps();
      Transpose8(r);
      for (int j = 0; j < 8; ++j) {
        if (j * C + c8 + 8 <= 8 * C)
          _mm256_storeu_ps(x + (t + j) * C + c8, r[j]);
        else
          _mm256_maskstore_ps(x + (t + j) * C + c8, mask, r[j]);
      }
    }
    for (int64_t c = 0; c < c8; c += 8) {
      if (to_tile) {
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(x + (t + j) * C + c);
        Transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(tile + (c + j) * kTile + t, r[j]);
      } else {
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(tile + (c + j) * kTile + t);
        Transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(x + (t + j) * C + c, r[j]);
      }
    }
  }
}
#endif

// tile[c * kTile + t] <-> x[t, c] for t < n, c < C, by 8 x 8 blocks (kAvx2)
// and then one value at a time.
template <bool kAvx2, typename F>
LOVASZ_JAX_INLINE void MoveTile(F* x, int64_t C, int64_t n, F* tile, bool to_tile) {
  int64_t n8 = 0;
#ifdef LOVASZ_JAX_X86_CLONES
  if constexpr (kAvx2 && std::is_same_v<F, float>) {
    n8 = n & ~int64_t{7};
    TransposeBlocks(x, C, n8, tile, to_tile);
  }
#endif
  for (int64_t t = n8; t < n; ++t)
    for (int64_t c = 0; c < C; ++c) {
      if (to_tile)
        tile[c * kTile + t] = x[t * C + c];
      else
        x[t * C + c] = tile[c * kTile + t];
    }
}

// x[t0 + t, c] -> tile[c * kTile + t] for t < n (the rest of the tile: 0).
template <typename F, bool kAvx2 = false>
LOVASZ_JAX_INLINE void LoadClassMajor(const F* x, int64_t C, int64_t n, F* tile) {
  if constexpr (kAvx2) {
    MoveTile<kAvx2>(const_cast<F*>(x), C, n, tile, true);
    if (n < kTile)
      for (int64_t c = 0; c < C; ++c)
        std::fill(tile + c * kTile + n, tile + (c + 1) * kTile, F(0));
    return;
  }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < C; ++c) tile[c * kTile + t] = x[t * C + c];
  if (n < kTile)
    for (int64_t c = 0; c < C; ++c) std::fill(tile + c * kTile + n, tile + (c + 1) * kTile, F(0));
}

// Probabilities of a class-major tile of logits, in place, and (unless lse is
// null) each pixel's log-sum-exp. Void pixels' logits are replaced by 0 first
// (they may hold anything): their probabilities are then 1 / C, used by
// nothing.
template <typename F>
LOVASZ_JAX_INLINE void SoftmaxTile(F* e, const int32_t* lab, int64_t C, int64_t n, F* m, F* s,
                 F* lse) {
  for (int64_t t = 0; t < kTile; ++t) m[t] = -std::numeric_limits<F>::infinity();
  for (int64_t t = 0; t < n; ++t)
    if (lab[t] == kVoidLabel)
      for (int64_t c = 0; c < C; ++c) e[c * kTile + t] = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kTile; ++t) m[t] = std::max(m[t], e[c * kTile + t]);
  for (int64_t t = 0; t < kTile; ++t) s[t] = 0;
  for (int64_t c = 0; c < C; ++c) {
    F* row = e + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      row[t] = ExpNonPositive(row[t] - m[t]);
      s[t] += row[t];
    }
  }
  if (lse)  // (not wanted by the histogram gradient pass)
    for (int64_t t = 0; t < kTile; ++t) lse[t] = m[t] + LogPositive(s[t]);
  for (int64_t t = 0; t < kTile; ++t) s[t] = F(1) / s[t];
  for (int64_t c = 0; c < C; ++c) {
    F* row = e + c * kTile;
    for (int64_t t = 0; t < kTile; ++t) row[t] *= s[t];
  }
}

// SoftmaxTile for float32, compiled once (per clone) and called by both the
// encode pass and the histogram gradient pass, so that both get the same
// probabilities bit for bit (inlined into each, the compiler could contract
// different products into FMAs), and so the same histogram keys.
LOVASZ_JAX_CLONES __attribute__((noinline)) void SoftmaxTileF32(
    float* e, const int32_t* lab, int64_t C, int64_t n, float* m, float* s, float* lse) {
  SoftmaxTile(e, lab, C, n, m, s, lse);
}

template <typename F>
LOVASZ_JAX_INLINE void Softmax(F* e, const int32_t* lab, int64_t C, int64_t n, F* m, F* s,
                               F* lse) {
  if constexpr (std::is_same_v<F, float>)
    SoftmaxTileF32(e, lab, C, n, m, s, lse);
  else
    SoftmaxTile(e, lab, C, n, m, s, lse);
}

// One block of pixels [i0, i1) of group g; tiles: Tiles<F>(C).v. With
// counts (histogram mode), the keys are not written but counted into
// counts[c, key] (the group's [C, 2K + 1] table).
template <typename F, typename K, bool kAvx2 = false>
LOVASZ_JAX_INLINE void EncodeBlock(const F* x, const int32_t* labels, K* keys,
                                   int32_t* counts, F* lse, int32_t* bad, int64_t P,
                                   int64_t C, int64_t g, int64_t i0, int64_t i1,
                                   int64_t num_bins, bool softmax, F* tiles) {
  F* p = tiles;
  F* m = p + 3 * kTile * C;
  F* s = m + kTile;
  F* l = s + kTile;
  // What a valid pixel's values may be: finite logits, or probabilities in
  // [0, 1] (NaN is neither).
  const F lo = softmax ? -std::numeric_limits<F>::max() : F(0);
  const F hi = softmax ? std::numeric_limits<F>::max() : F(1);
  int32_t out_of_range[kTile];
  K tile_keys[2 * kTile];  // two rows' keys, counted together
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t n = std::min(kTile, i1 - t0);
    const int32_t* lab = labels + g * P + t0;
    LoadClassMajor<F, kAvx2>(x + (g * P + t0) * C, C, n, p);
    for (int64_t t = 0; t < kTile; ++t) out_of_range[t] = 0;
    for (int64_t c = 0; c < C; ++c) {
      const F* row = p + c * kTile;
      for (int64_t t = 0; t < kTile; ++t) out_of_range[t] |= !(row[t] >= lo && row[t] <= hi);
    }
    for (int64_t t = 0; t < n; ++t)
      bad[g * P + t0 + t] = lab[t] == kVoidLabel ? 0 : out_of_range[t];
    if (softmax) {
      Softmax(p, lab, C, n, m, s, l);
      std::copy(l, l + n, lse + g * P + t0);
    } else {
      std::fill(lse + g * P + t0, lse + g * P + t0 + n, F(0));
    }
    // (Two loops, so that each vectorises with 32-bit lanes for float32.)
    using I = std::conditional_t<sizeof(F) == 4, int32_t, int64_t>;
    for (I c = 0; c < static_cast<I>(C); ++c) {
      const F* row = p + c * kTile;
      K* out = counts ? tile_keys + (c & 1) * kTile : keys + (g * C + c) * P + t0;
      if (num_bins) {
        const F scale = static_cast<F>(num_bins);
        const F top = static_cast<F>(num_bins - 1);
        for (int64_t t = 0; t < n; ++t)
          out[t] = HistogramKey<F, K, I>(row[t], lab[t], c, scale, top, num_bins);
        // Counted by pairs of rows, one pixel of each in turn: two
        // increments of one slot in a row (many pixels share a bin) are
        // then further apart, and each waits less for the one before.
        const int64_t slots = 2 * num_bins + 1;
        if (counts && (c & 1)) {
          int32_t* a = counts + (c - 1) * slots;
          int32_t* b = a + slots;
          for (int64_t t = 0; t < n; ++t) {
            ++a[tile_keys[t]];
            ++b[tile_keys[kTile + t]];
          }
        } else if (counts && c == static_cast<I>(C) - 1) {
          int32_t* table = counts + c * slots;
          for (int64_t t = 0; t < n; ++t) ++table[out[t]];
        }
      } else {
        for (int64_t t = 0; t < n; ++t) {
          const I l = lab[t];
          const bool fg = l == c;
          const F e = std::fabs((fg ? F(1) : F(0)) - row[t]);
          const K key = ErrorKey<F, K>(e, fg);
          out[t] = l == kVoidLabel ? K(0) : key;
        }
      }
    }
  }
}

// The float32 passes for x86-64-v3 (AVX2, FMA: eight lanes, 8 x 8 block
// transposes, gathers), chosen at run time when the CPU has it, else for the
// baseline. Both compute the same values (the probabilities in the one
// SoftmaxTileF32, bit for bit up to its own clones' FMA contraction).
#ifdef LOVASZ_JAX_X86_CLONES
bool HasV3() {
  static const bool v3 = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v3"));
  return v3;
}

__attribute__((target("arch=x86-64-v3"))) void EncodeBlockV3(
    const float* x, const int32_t* labels, uint32_t* keys, int32_t* counts, float* lse,
    int32_t* bad, int64_t P, int64_t C, int64_t g, int64_t i0, int64_t i1,
    int64_t num_bins, bool softmax, float* tiles) {
  EncodeBlock<float, uint32_t, true>(x, labels, keys, counts, lse, bad, P, C, g, i0, i1,
                                     num_bins, softmax, tiles);
}
#endif

void EncodeBlockF32(const float* x, const int32_t* labels, uint32_t* keys,
                    int32_t* counts, float* lse, int32_t* bad, int64_t P, int64_t C,
                    int64_t g, int64_t i0, int64_t i1, int64_t num_bins, bool softmax,
                    float* tiles) {
#ifdef LOVASZ_JAX_X86_CLONES
  if (HasV3()) {
    EncodeBlockV3(x, labels, keys, counts, lse, bad, P, C, g, i0, i1, num_bins, softmax,
                  tiles);
    return;
  }
#endif
  EncodeBlock(x, labels, keys, counts, lse, bad, P, C, g, i0, i1, num_bins, softmax, tiles);
}

template <typename F, typename K>
LOVASZ_JAX_INLINE void EncodeAny(const F* x, const int32_t* labels, K* keys,
                                 int32_t* counts, F* lse, int32_t* bad, int64_t P,
                                 int64_t C, int64_t g, int64_t i0, int64_t i1,
                                 int64_t num_bins, bool softmax, F* tiles) {
  if constexpr (std::is_same_v<F, float>)
    EncodeBlockF32(x, labels, keys, counts, lse, bad, P, C, g, i0, i1, num_bins, softmax,
                   tiles);
  else
    EncodeBlock(x, labels, keys, counts, lse, bad, P, C, g, i0, i1, num_bins, softmax,
                tiles);
}

template <typename F, typename K>
void EncodePixels(ffi::ThreadPool& pool, const F* x, const int32_t* labels,
                  K* keys, F* lse, int32_t* bad, int64_t groups, int64_t P,
                  int64_t C, int64_t num_bins, bool softmax) {
  ForEachPixelBlock<F>(pool, groups, P, C,
                       [=](int64_t g, int64_t i0, int64_t i1, F* tiles) {
    EncodeAny(x, labels, keys, static_cast<int32_t*>(nullptr), lse, bad, P, C, g, i0, i1,
              num_bins, softmax, tiles);
  });
}

// Histogram mode: the encode pass counting each row's keys into counts
// [groups, C, 2K + 1] as it computes them, without writing them. The blocks
// are claimed one by one like rows (so that a thread held up elsewhere
// holds up no share of the work), by at most kMaxStripes threads, and only
// as many as keep their extra tables within kStripeBytes; each counts into
// a table of its own (the first to start into counts), and the tables are
// then summed, row by row.
constexpr int64_t kMaxStripes = 16;
constexpr int64_t kStripeBytes = int64_t{1} << 26;

template <typename F>
void EncodeCountPixels(ffi::ThreadPool& pool, const F* x, const int32_t* labels,
                       int32_t* counts, F* lse, int32_t* bad, int64_t groups, int64_t P,
                       int64_t C, int64_t num_bins, bool softmax) {
  using K = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  const int64_t slots = 2 * num_bins + 1, table = groups * C * slots;
  std::fill(counts, counts + table, 0);
  const int64_t blocks = (P + kPixelBlock - 1) / kPixelBlock, units = groups * blocks;
  if (units == 0) return;
  const int64_t threads = units * kPixelBlock * C < kParallelKeys ? 1 : pool.num_threads();
  const int64_t affordable = 1 + kStripeBytes / (table * static_cast<int64_t>(sizeof(int32_t)));
  const int64_t stripes =
      std::max<int64_t>(1, std::min({units, threads, kMaxStripes, affordable}));
  std::vector<int32_t> partial(static_cast<size_t>((stripes - 1) * table), 0);
  int32_t* extra = partial.data();
  auto participants = std::make_shared<std::atomic<int64_t>>(0);
  ParallelRows(pool, units, kPixelBlock * C,
               [=](int64_t first, int64_t last, Scratch& scratch) {
    if (scratch.participant < 0) scratch.participant = participants->fetch_add(1);
    int32_t* mine = scratch.participant == 0 ? counts : extra + (scratch.participant - 1) * table;
    Tiles<F> tiles(C);
    for (int64_t u = first; u < last; ++u) {
      const int64_t g = u / blocks, i0 = (u % blocks) * kPixelBlock;
      EncodeAny(x, labels, static_cast<K*>(nullptr), mine + g * C * slots, lse, bad, P, C,
                g, i0, std::min(P, i0 + kPixelBlock), num_bins, softmax, tiles.v.data());
    }
  }, stripes);
  if (stripes > 1)
    ParallelRows(pool, groups * C, slots * stripes,
                 [=](int64_t first, int64_t last, Scratch&) {
      for (int64_t r = first; r < last; ++r)
        for (int64_t st = 1; st < stripes; ++st) {
          const int32_t* from = extra + (st - 1) * table + r * slots;
          int32_t* to = counts + r * slots;
          for (int64_t k = 0; k < slots; ++k) to[k] += from[k];
        }
    });
}

// lovasz_jax_encode_counts: (x [..., P, C], labels [..., P]) -> (counts
// [..., C, 2K + 1] s32, lse [..., P], bad [..., P]): lovasz_jax_encode with
// num_bins = K >= 1, each row's keys counted per slot instead of written.
ffi::Error EncodeCountsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::S32> labels,
                            ffi::Result<ffi::Buffer<ffi::S32>> counts,
                            ffi::Result<ffi::AnyBuffer> lse,
                            ffi::Result<ffi::Buffer<ffi::S32>> bad, int64_t num_bins,
                            int64_t softmax) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x must have rank >= 2");
  const int64_t P = dims[dims.size() - 2], C = dims.back();
  if (P > static_cast<int64_t>(INT32_MAX))
    return ffi::Error::InvalidArgument("rows longer than 2^31 - 1 pixels are not supported");
  if (num_bins < 1 || num_bins >= (int64_t{1} << 30))
    return ffi::Error::InvalidArgument("num_bins must be in [1, 2^30)");
  const int64_t slots = 2 * num_bins + 1;
  const auto cd = counts->dimensions();
  if (cd.size() != dims.size() || cd.back() != slots || cd[cd.size() - 2] != C)
    return ffi::Error::InvalidArgument("counts must be [..., C, 2 num_bins + 1]");
  const int64_t groups = static_cast<int64_t>(counts->element_count()) / (C * slots);
  if (static_cast<int64_t>(x.element_count()) != groups * P * C ||
      static_cast<int64_t>(labels.element_count()) != groups * P ||
      static_cast<int64_t>(lse->element_count()) != groups * P ||
      static_cast<int64_t>(bad->element_count()) != groups * P)
    return ffi::Error::InvalidArgument("labels, lse and bad must be [..., P]");
  const auto t = x.element_type();
  if (lse->element_type() != t)
    return ffi::Error::InvalidArgument("x and lse must share a dtype");
  if (t == ffi::DataType::F32)
    EncodeCountPixels(pool, x.typed_data<float>(), labels.typed_data(), counts->typed_data(),
                      lse->typed_data<float>(), bad->typed_data(), groups, P, C, num_bins,
                      softmax != 0);
  else if (t == ffi::DataType::F64)
    EncodeCountPixels(pool, x.typed_data<double>(), labels.typed_data(),
                      counts->typed_data(), lse->typed_data<double>(), bad->typed_data(),
                      groups, P, C, num_bins, softmax != 0);
  else
    return ffi::Error::InvalidArgument("expected f32 or f64 x");
  return ffi::Error::Success();
}

ffi::Error EncodeImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                      ffi::Buffer<ffi::S32> labels,
                      ffi::Result<ffi::AnyBuffer> keys,
                      ffi::Result<ffi::AnyBuffer> lse,
                      ffi::Result<ffi::Buffer<ffi::S32>> bad, int64_t num_bins,
                      int64_t softmax) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x must have rank >= 2");
  const int64_t P = dims[dims.size() - 2], C = dims.back();
  if (P > static_cast<int64_t>(INT32_MAX))
    return ffi::Error::InvalidArgument("rows longer than 2^31 - 1 pixels are not supported");
  if (num_bins < 0 || num_bins > (int64_t{1} << 30))
    return ffi::Error::InvalidArgument("num_bins must be in [0, 2^30]");
  const int64_t groups = P * C == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (P * C);
  if (static_cast<int64_t>(labels.element_count()) != groups * P ||
      keys->element_count() != x.element_count() ||
      (P * C != 0 && (static_cast<int64_t>(lse->element_count()) != groups * P ||
                      static_cast<int64_t>(bad->element_count()) != groups * P)))
    return ffi::Error::InvalidArgument(
        "labels, lse and bad must be [..., P] and keys [..., C, P]");
  const auto t = x.element_type();
  if (lse->element_type() != t)
    return ffi::Error::InvalidArgument("x and lse must share a dtype");
  if (t == ffi::DataType::F32 && keys->element_type() == ffi::DataType::U32)
    EncodePixels(pool, x.typed_data<float>(), labels.typed_data(),
                 keys->typed_data<uint32_t>(), lse->typed_data<float>(), bad->typed_data(),
                 groups, P, C, num_bins, softmax != 0);
  else if (t == ffi::DataType::F64 && keys->element_type() == ffi::DataType::U64)
    EncodePixels(pool, x.typed_data<double>(), labels.typed_data(),
                 keys->typed_data<uint64_t>(), lse->typed_data<double>(), bad->typed_data(),
                 groups, P, C, num_bins, softmax != 0);
  else
    return ffi::Error::InvalidArgument("expected f32 x -> u32 keys or f64 -> u64");
  return ffi::Error::Success();
}

// One block of pixels [i0, i1) of group g; tiles: Tiles<F>(C).v.
template <typename F, bool kAvx2 = false>
LOVASZ_JAX_INLINE void GradBlock(const F* x, const F* lse, const int32_t* labels,
                                 const F* w, const F* ct, F* d, int64_t P, int64_t C,
                                 int64_t g, int64_t i0, int64_t i1, bool softmax,
                                 F* tiles) {
  F* p = tiles;
  F* dp = p + kTile * C;
  F* out = dp + kTile * C;
  F* dot = out + kTile * C;
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t n = std::min(kTile, i1 - t0);
    const int32_t* lab = labels + g * P + t0;
    // d_p, class-major: each row's weights scaled by its cotangent, negated
    // at the row's foreground pixels.
    for (int64_t c = 0; c < C; ++c) {
      const F scale = ct[g * C + c];
      const F* row = w + (g * C + c) * P + t0;
      F* r = dp + c * kTile;
      for (int64_t t = 0; t < n; ++t) r[t] = (lab[t] == c ? -scale : scale) * row[t];
    }
    if (!softmax) {
      MoveTile<kAvx2>(d + (g * P + t0) * C, C, n, dp, false);
      continue;
    }
    LoadClassMajor<F, kAvx2>(x + (g * P + t0) * C, C, n, p);
    const F* l = lse + g * P + t0;
    for (int64_t t = 0; t < kTile; ++t) dot[t] = 0;
    for (int64_t c = 0; c < C; ++c) {
      F* row = p + c * kTile;
      const F* r = dp + c * kTile;
      for (int64_t t = 0; t < n; ++t) {
        row[t] = ExpNonPositive(row[t] - l[t]);
        dot[t] += r[t] * row[t];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const F* row = p + c * kTile;
      const F* r = dp + c * kTile;
      F* o = out + c * kTile;
      for (int64_t t = 0; t < n; ++t)
        o[t] = lab[t] == kVoidLabel ? r[t] : row[t] * (r[t] - dot[t]);
    }
    MoveTile<kAvx2>(d + (g * P + t0) * C, C, n, out, false);
  }
}

#ifdef LOVASZ_JAX_X86_CLONES
__attribute__((target("arch=x86-64-v3"))) void GradBlockV3(
    const float* x, const float* lse, const int32_t* labels, const float* w,
    const float* ct, float* d, int64_t P, int64_t C, int64_t g, int64_t i0, int64_t i1,
    bool softmax, float* tiles) {
  GradBlock<float, true>(x, lse, labels, w, ct, d, P, C, g, i0, i1, softmax, tiles);
}
#endif

void GradBlockF32(const float* x, const float* lse, const int32_t* labels, const float* w,
                  const float* ct, float* d, int64_t P, int64_t C, int64_t g, int64_t i0,
                  int64_t i1, bool softmax, float* tiles) {
#ifdef LOVASZ_JAX_X86_CLONES
  if (HasV3()) {
    GradBlockV3(x, lse, labels, w, ct, d, P, C, g, i0, i1, softmax, tiles);
    return;
  }
#endif
  GradBlock(x, lse, labels, w, ct, d, P, C, g, i0, i1, softmax, tiles);
}

// Histogram mode: one block of pixels [i0, i1) of group g, each pixel's
// weight in row c being omega[g, c, key] for its histogram key, which this
// recomputes from the logits exactly as the encode pass computed it (the same
// Softmax and HistogramKey), so that no key or weight is ever stored.
// r[t] = (lab[t] == c ? -sc : sc) * table[key[t]] for t < n: each pixel's
// slot weight, negated in its own class's row, times the row's cotangent.
template <typename F, typename K, typename I>
LOVASZ_JAX_INLINE void WeighByTable(const F* table, const K* key, const int32_t* lab, I c,
                                    F sc, int64_t n, F* r) {
  for (int64_t t = 0; t < n; ++t) r[t] = (lab[t] == c ? -sc : sc) * table[key[t]];
}

#ifdef LOVASZ_JAX_X86_CLONES
// The same with AVX2's gather, eight pixels at a time (GCC does not
// vectorise the loop above into gathers). The keys must be below 2^31.
__attribute__((target("arch=x86-64-v3"))) inline void WeighByTableAvx2(
    const float* table, const uint32_t* key, const int32_t* lab, int32_t c, float sc,
    int64_t n, float* r) {
  const __m256 pos = _mm256_set1_ps(sc), neg = _mm256_set1_ps(-sc);
  const __m256i cls = _mm256_set1_epi32(c);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + t));
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lab + t));
    const __m256 w = _mm256_i32gather_ps(table, k, 4);
    const __m256 sign =
        _mm256_blendv_ps(pos, neg, _mm256_castsi256_ps(_mm256_cmpeq_epi32(l, cls)));
    _mm256_storeu_ps(r + t, _mm256_mul_ps(sign, w));
  }
  WeighByTable(table, key + t, lab + t, c, sc, n - t, r + t);
}
#endif

template <typename F, bool kAvx2 = false>
LOVASZ_JAX_INLINE void GradTableBlock(const F* x, const int32_t* labels, const F* omega,
                                      int64_t slots, const F* ct, F* d, int64_t P,
                                      int64_t C, int64_t g, int64_t i0, int64_t i1,
                                      bool softmax, F* tiles) {
  using K = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  using I = std::conditional_t<sizeof(F) == 4, int32_t, int64_t>;
  const int64_t num_bins = (slots - 1) / 2;
  const F scale = static_cast<F>(num_bins), top = static_cast<F>(num_bins - 1);
  F* p = tiles;
  F* dp = p + kTile * C;
  F* out = dp + kTile * C;
  F* m = out + kTile * C;
  F* sum = m + kTile;
  K key[kTile];
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t n = std::min(kTile, i1 - t0);
    const int32_t* lab = labels + g * P + t0;
    LoadClassMajor<F, kAvx2>(x + (g * P + t0) * C, C, n, p);
    if (softmax) Softmax(p, lab, C, n, m, sum, static_cast<F*>(nullptr));
    for (I c = 0; c < static_cast<I>(C); ++c) {
      const F* row = p + c * kTile;
      const F* table = omega + (g * C + c) * slots;
      const F sc = ct[g * C + c];
      F* r = dp + c * kTile;
      for (int64_t t = 0; t < n; ++t)
        key[t] = HistogramKey<F, K, I>(row[t], lab[t], c, scale, top, num_bins);
      // (Key 0, a void pixel's, has weight omega[0] = 0.)
#ifdef LOVASZ_JAX_X86_CLONES
      if constexpr (kAvx2) {
        WeighByTableAvx2(table, key, lab, c, sc, n, r);
        continue;
      }
#endif
      WeighByTable(table, key, lab, c, sc, n, r);
    }
    if (!softmax) {
      MoveTile<kAvx2>(d + (g * P + t0) * C, C, n, dp, false);
      continue;
    }
    F* dot = m;  // (free once the softmax is done)
    for (int64_t t = 0; t < kTile; ++t) dot[t] = 0;
    for (int64_t c = 0; c < C; ++c) {
      const F* row = p + c * kTile;
      const F* r = dp + c * kTile;
      for (int64_t t = 0; t < n; ++t) dot[t] += r[t] * row[t];
    }
    for (int64_t c = 0; c < C; ++c) {
      const F* row = p + c * kTile;
      const F* r = dp + c * kTile;
      F* o = out + c * kTile;
      for (int64_t t = 0; t < n; ++t)
        o[t] = lab[t] == kVoidLabel ? r[t] : row[t] * (r[t] - dot[t]);
    }
    MoveTile<kAvx2>(d + (g * P + t0) * C, C, n, out, false);
  }
}

#ifdef LOVASZ_JAX_X86_CLONES
__attribute__((target("arch=x86-64-v3"))) void GradTableBlockV3(
    const float* x, const int32_t* labels, const float* omega, int64_t slots,
    const float* ct, float* d, int64_t P, int64_t C, int64_t g, int64_t i0, int64_t i1,
    bool softmax, float* tiles) {
  GradTableBlock<float, true>(x, labels, omega, slots, ct, d, P, C, g, i0, i1, softmax,
                              tiles);
}
#endif

void GradTableBlockF32(const float* x, const int32_t* labels, const float* omega,
                       int64_t slots, const float* ct, float* d, int64_t P, int64_t C,
                       int64_t g, int64_t i0, int64_t i1, bool softmax, float* tiles) {
#ifdef LOVASZ_JAX_X86_CLONES
  if (HasV3() && slots <= INT32_MAX) {
    GradTableBlockV3(x, labels, omega, slots, ct, d, P, C, g, i0, i1, softmax, tiles);
    return;
  }
#endif
  GradTableBlock(x, labels, omega, slots, ct, d, P, C, g, i0, i1, softmax, tiles);
}

template <typename F>
void GradPixels(ffi::ThreadPool& pool, const F* x, const F* lse,
                const int32_t* labels, const F* w, const F* ct, F* d,
                int64_t groups, int64_t P, int64_t C, bool softmax) {
  ForEachPixelBlock<F>(pool, groups, P, C,
                       [=](int64_t g, int64_t i0, int64_t i1, F* tiles) {
    if constexpr (std::is_same_v<F, float>)
      GradBlockF32(x, lse, labels, w, ct, d, P, C, g, i0, i1, softmax, tiles);
    else
      GradBlock(x, lse, labels, w, ct, d, P, C, g, i0, i1, softmax, tiles);
  });
}

template <typename F>
void GradTablePixels(ffi::ThreadPool& pool, const F* x, const int32_t* labels,
                     const F* omega, int64_t slots, const F* ct, F* d, int64_t groups,
                     int64_t P, int64_t C, bool softmax) {
  ForEachPixelBlock<F>(pool, groups, P, C,
                       [=](int64_t g, int64_t i0, int64_t i1, F* tiles) {
    if constexpr (std::is_same_v<F, float>)
      GradTableBlockF32(x, labels, omega, slots, ct, d, P, C, g, i0, i1, softmax, tiles);
    else
      GradTableBlock(x, labels, omega, slots, ct, d, P, C, g, i0, i1, softmax, tiles);
  });
}

ffi::Error GradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer lse,
                    ffi::Buffer<ffi::S32> labels, ffi::AnyBuffer w,
                    ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> d,
                    int64_t softmax) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("x must have rank >= 2");
  const int64_t P = dims[dims.size() - 2], C = dims.back();
  const int64_t groups = P * C == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (P * C);
  if (static_cast<int64_t>(labels.element_count()) != groups * P ||
      static_cast<int64_t>(lse.element_count()) != groups * P ||
      w.element_count() != x.element_count() ||
      d->element_count() != x.element_count() ||
      (P * C != 0 && static_cast<int64_t>(ct.element_count()) != groups * C))
    return ffi::Error::InvalidArgument(
        "lse and labels must be [..., P], weights [..., C, P] and ct [..., C]");
  const auto t = x.element_type();
  if (lse.element_type() != t || w.element_type() != t || ct.element_type() != t ||
      d->element_type() != t)
    return ffi::Error::InvalidArgument("x, lse, weights, ct and the result must share a dtype");
  if (t == ffi::DataType::F32)
    GradPixels(pool, x.typed_data<float>(), lse.typed_data<float>(), labels.typed_data(),
               w.typed_data<float>(), ct.typed_data<float>(), d->typed_data<float>(),
               groups, P, C, softmax != 0);
  else if (t == ffi::DataType::F64)
    GradPixels(pool, x.typed_data<double>(), lse.typed_data<double>(), labels.typed_data(),
               w.typed_data<double>(), ct.typed_data<double>(), d->typed_data<double>(),
               groups, P, C, softmax != 0);
  else
    return ffi::Error::InvalidArgument("expected f32 or f64");
  return ffi::Error::Success();
}

// lovasz_jax_grad_table: lovasz_jax_grad in histogram mode, (x [..., P, C],
// labels [..., P], omega [..., C, 2K + 1], ct [..., C]) -> [..., P, C]: each
// pixel's weight in row c is omega[..., c, key], its histogram key
// recomputed from x as lovasz_jax_encode (num_bins = K) computed it.
ffi::Error GradTableImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                         ffi::Buffer<ffi::S32> labels, ffi::AnyBuffer omega,
                         ffi::AnyBuffer ct, ffi::Result<ffi::AnyBuffer> d,
                         int64_t softmax) {
  const auto dims = x.dimensions(), od = omega.dimensions();
  if (dims.size() < 2 || od.size() != dims.size() || od.back() < 3 || od.back() % 2 == 0)
    return ffi::Error::InvalidArgument(
        "x must have rank >= 2, and omega the same rank with 2K + 1 slots");
  const int64_t P = dims[dims.size() - 2], C = dims.back(), slots = od.back();
  if ((slots - 1) / 2 > (int64_t{1} << 30))
    return ffi::Error::InvalidArgument("num_bins must be in [1, 2^30]");
  const int64_t groups = P * C == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (P * C);
  if (static_cast<int64_t>(labels.element_count()) != groups * P ||
      d->element_count() != x.element_count() ||
      (P * C != 0 && (static_cast<int64_t>(ct.element_count()) != groups * C ||
                      static_cast<int64_t>(omega.element_count()) != groups * C * slots)))
    return ffi::Error::InvalidArgument(
        "labels must be [..., P], omega [..., C, slots] and ct [..., C]");
  const auto t = x.element_type();
  if (omega.element_type() != t || ct.element_type() != t || d->element_type() != t)
    return ffi::Error::InvalidArgument("x, omega, ct and the result must share a dtype");
  if (t == ffi::DataType::F32)
    GradTablePixels(pool, x.typed_data<float>(), labels.typed_data(),
                    omega.typed_data<float>(), slots, ct.typed_data<float>(),
                    d->typed_data<float>(), groups, P, C, softmax != 0);
  else if (t == ffi::DataType::F64)
    GradTablePixels(pool, x.typed_data<double>(), labels.typed_data(),
                    omega.typed_data<double>(), slots, ct.typed_data<double>(),
                    d->typed_data<double>(), groups, P, C, softmax != 0);
  else
    return ffi::Error::InvalidArgument("expected f32 or f64");
  return ffi::Error::Success();
}

// lovasz_jax_class_counts: labels [..., P] (s32) -> counts [..., C] (s32),
// how many pixels of each group carry each label in [0, C) (other labels,
// void included, count for nothing): which classes are present. Four
// interleaved counters per class, so that runs of one label (the usual case
// in a label map) do not make each increment wait for the one before.
ffi::Error ClassCountsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> labels,
                           ffi::Result<ffi::Buffer<ffi::S32>> counts) {
  const auto ld = labels.dimensions(), cd = counts->dimensions();
  if (ld.size() == 0 || cd.size() != ld.size())
    return ffi::Error::InvalidArgument("labels [..., P] and counts [..., C] must share a rank");
  const int64_t P = ld.back(), C = cd.back();
  const int64_t groups = C == 0 ? 0 : static_cast<int64_t>(counts->element_count()) / C;
  if (static_cast<int64_t>(labels.element_count()) != groups * P)
    return ffi::Error::InvalidArgument("labels and counts must have the same leading axes");
  const int32_t* lab = labels.typed_data();
  int32_t* out = counts->typed_data();
  ParallelRows(pool, groups, P, [=](int64_t first, int64_t last, Scratch&) {
    std::vector<int32_t> four(static_cast<size_t>(4 * C));
    for (int64_t g = first; g < last; ++g) {
      std::fill(four.begin(), four.end(), 0);
      const int32_t* l = lab + g * P;
      for (int64_t i = 0; i < P; ++i) {
        const int32_t v = l[i];
        if (v >= 0 && v < C) ++four[(i & 3) * C + v];
      }
      for (int64_t c = 0; c < C; ++c)
        out[g * C + c] = four[c] + four[C + c] + four[2 * C + c] + four[3 * C + c];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#if defined(_WIN32)
#define LOVASZ_JAX_EXPORT __declspec(dllexport)
#else
#define LOVASZ_JAX_EXPORT __attribute__((visibility("default")))
#endif

// The XLA FFI API version of the headers this file was compiled against.
extern "C" LOVASZ_JAX_EXPORT void LovaszJaxFfiApiVersion(int32_t* major,
                                                         int32_t* minor) {
  *major = XLA_FFI_API_MAJOR;
  *minor = XLA_FFI_API_MINOR;
}

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxWeights(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxWeights, WeightsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_bins"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxCounts(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxCounts, CountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_bins"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxLookup(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxLookup, LookupImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxEncode(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxEncode, EncodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_bins")
                                  .Attr<int64_t>("softmax"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxGrad(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxGrad, GradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("softmax"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxSlots(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxSlots, SlotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_bins"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxGradTable(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxGradTable, GradTableImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("softmax"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxEncodeCounts(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxEncodeCounts, EncodeCountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("num_bins")
                                  .Attr<int64_t>("softmax"));

extern "C" LOVASZ_JAX_EXPORT XLA_FFI_Error* LovaszJaxClassCounts(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LovaszJaxClassCounts, ClassCountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
