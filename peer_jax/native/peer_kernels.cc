// CPU kernels for the three gather/scatter primitives of peer_jax/layers/expert_compute.py,
// exposed to XLA through its FFI (jax.ffi.ffi_call). float32 tables and activations, int32
// indices.
//
//   gather_dot(x[M,d], T[N,d], idx[M,S])     -> out[M,S],  out[m,s] = <x[m], T[idx[m,s]]>
//   embedding_bag(T[N,d], idx[M,S], w[M,S])  -> out[M,d],  out[m]   = sum_s w[m,s] T[idx[m,s]]
//   scatter_outer(idx[M,S], w[M,S], y[M,d])  -> out[N,d],  out[n]   = sum_{idx[m,s]=n} w[m,s] y[m]
//
// and the selection step of product_keys.product_key_topk (ProductKeyTopK, at the end), and two
// token-centric forms of the first two for decode steps, on float32 or bfloat16 tables
// (decode_gather_dot, decode_bag: see there).
//
// All three are expert-centric: the M·S (token, slot) pairs are grouped by table row with a
// stable counting sort (group_by_row, computed once and passed to each kernel that uses the same
// indices), and the table (or its gradient) is walked row by row, in order, each
// row read or written once and streamed, handling every pair routed to that row there. The
// token-side rows (x, y, the bag outputs: M·d floats) are what is accessed at random, and they
// are small enough to stay in cache. (Gathering T[idx] per token instead reads each row once
// per pair, at random: slower per kernel, see docs/peer_speed.md.) For tables that themselves fit
// in cache (the product-key sub-keys), bag_small and scatter_small do the last two
// token-centrically, without the grouping.
//
// Work is split into chunks of rows (ParallelForT below): no two chunks write the same element
// of a row-indexed output, and token-indexed outputs get one private accumulator per extra chunk,
// summed in chunk order at the end. Results are deterministic for a given chunk count; no
// atomics on data.
//
// An index outside [0, N) makes the kernel fail with an error instead of touching memory.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>
#include <thread>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Work is split into contiguous chunks run on XLA's intra-op thread pool (the FFI ThreadPool
// context), the calling thread included: the calling thread and the pool's threads claim chunks
// from an atomic counter, and the caller waits only for chunks already claimed, which are
// running, so a busy pool (XLA runs independent thunks concurrently) never deadlocks the call
// and never oversubscribes the cores: a kernel whose pool threads are busy runs on the caller
// alone. (Spawning its own threads per call, as before, put up to twice as many busy threads as
// cores on the machine while XLA ran another op alongside.) The chunk count is the pool's size,
// or PEER_JAX_NATIVE_THREADS, and fixes the summation order, so results do not depend on which
// thread runs which chunk.
int64_t Workers(ffi::ThreadPool& pool) {
  static const int64_t env = [] {
    const char* v = std::getenv("PEER_JAX_NATIVE_THREADS");
    return v ? static_cast<int64_t>(std::atoi(v)) : int64_t{0};
  }();
  if (env > 0) return env;
  return std::max<int64_t>(1, pool.num_threads());
}

int64_t ChunksFor(ffi::ThreadPool& pool, int64_t n, int64_t min_per_chunk) {
  return std::min<int64_t>(Workers(pool), std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_chunk)));
}

// Runs fn(chunk, begin, end) over [0, n) split into `chunks` contiguous ranges.
template <typename Fn>
void ParallelForT(ffi::ThreadPool& pool, int64_t n, int64_t chunks, Fn fn) {
  if (chunks <= 1) {
    fn(int64_t{0}, int64_t{0}, n);
    return;
  }
  const int64_t size = (n + chunks - 1) / chunks;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  Fn* body = &fn;  // dereferenced only for a claimed chunk, i.e. while this call is waiting
  auto work = [state, body, n, chunks, size] {
    for (int64_t c; (c = state->next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t b = c * size, e = std::min(n, b + size);
      if (b < e) (*body)(c, b, e);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < chunks; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Runs fn(begin, end) over [0, n) in chunks of at least min_per_chunk (one per worker at most).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t min_per_chunk, Fn fn) {
  ParallelForT(pool, n, ChunksFor(pool, n, min_per_chunk), [&](int64_t, int64_t b, int64_t e) { fn(b, e); });
}

// The (token, slot) pairs grouped by table row: pairs of row r are order[start[r] .. start[r+1]),
// in increasing pair index (a stable counting sort), so per-row sums are deterministic. Computed
// once per custom-VJP call by GroupByRow and shared by its forward and backward kernels.
// Fails (returns false) on an index outside [0, rows) instead of writing out of bounds.
bool SortByRow(const int32_t* idx, int64_t pairs, int64_t rows, int32_t* start, int32_t* order) {
  std::fill(start, start + rows + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    if (idx[p] < 0 || idx[p] >= rows) return false;
    ++start[idx[p] + 1];
  }
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int32_t> fill(start, start + rows);
  for (int64_t p = 0; p < pairs; ++p) order[fill[idx[p]]++] = static_cast<int32_t>(p);
  return true;
}

// Eight-float vectors (GCC/Clang vector extension: AVX with -march=native, plain SSE or scalar
// code elsewhere); loads and stores go through memcpy, so rows need no particular alignment.
typedef float F8 __attribute__((vector_size(32)));

inline F8 Load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float Sum8(F8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Table rows are float32 or bfloat16 (uint16_t here: the high half of a float32's bits), widened
// to float32 element by element as they are read, so no float32 copy of a table ever exists.
inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline F8 LoadRow8(const float* p) { return Load8(p); }
inline F8 LoadRow8(const uint16_t* p) {
  typedef uint16_t H8 __attribute__((vector_size(16)));
  typedef uint32_t U8 __attribute__((vector_size(32)));
  H8 h;
  std::memcpy(&h, p, sizeof(h));
  const U8 u = __builtin_convertvector(h, U8) << 16;
  F8 f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// <a, b> with four independent vector accumulators: a single accumulator chains every multiply-add
// through the FMA latency, which made gather_dot slower. (Software-prefetching the next pairs'
// token rows made no kernel faster. Timings: docs/peer_speed.md.)
template <typename T>
inline float Dot(const float* __restrict a, const T* __restrict b, int64_t d) {
  F8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    s0 += Load8(a + i) * LoadRow8(b + i);
    s1 += Load8(a + i + 8) * LoadRow8(b + i + 8);
    s2 += Load8(a + i + 16) * LoadRow8(b + i + 16);
    s3 += Load8(a + i + 24) * LoadRow8(b + i + 24);
  }
  for (; i + 8 <= d; i += 8) s0 += Load8(a + i) * LoadRow8(b + i);
  float acc = Sum8((s0 + s1) + (s2 + s3));
  for (; i < d; ++i) acc += a[i] * ToF32(b[i]);
  return acc;
}

inline void Axpy(float w, const float* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += w * x[i];
}

// The bfloat16 row widened eight at a time (the compiler does not vectorise the scalar form).
inline void Axpy(float w, const uint16_t* __restrict x, float* __restrict y, int64_t d) {
  const F8 wv = F8{} + w;
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const F8 r = Load8(y + i) + wv * LoadRow8(x + i);
    std::memcpy(y + i, &r, sizeof(r));
  }
  for (; i < d; ++i) y[i] += w * ToF32(x[i]);
}

// dst[0:d] = src[0:d], bypassing the cache (non-temporal AVX stores) when dst is 32-byte aligned
// and d a multiple of 8; StreamFence() orders those stores before the kernel returns.
inline void StreamRow(const float* __restrict src, float* __restrict dst, int64_t d) {
#ifdef __AVX__
  if (reinterpret_cast<uintptr_t>(dst) % 32 == 0 && d % 8 == 0) {
    for (int64_t i = 0; i < d; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    return;
  }
#endif
  std::memcpy(dst, src, sizeof(float) * d);
}

inline void StreamFence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

ffi::Error CheckRank2(const ffi::Span<const int64_t>& dims, const char* what) {
  if (dims.size() != 2) return ffi::Error::InvalidArgument(std::string(what) + " must have rank 2");
  return ffi::Error::Success();
}

// start [N+1] and order [M*S] from GroupByRow must match the table rows and the pairs.
ffi::Error CheckGroups(const ffi::Buffer<ffi::S32>& start, const ffi::Buffer<ffi::S32>& order, int64_t rows,
                       int64_t pairs) {
  if (static_cast<int64_t>(start.element_count()) != rows + 1 || static_cast<int64_t>(order.element_count()) != pairs)
    return ffi::Error::InvalidArgument("groups do not match the table rows / pairs: recompute them with group_by_row");
  return ffi::Error::Success();
}

ffi::Error GroupByRowImpl(ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::S32> start,
                          ffi::ResultBuffer<ffi::S32> order) {
  const int64_t rows = static_cast<int64_t>(start->element_count()) - 1;
  if (!SortByRow(idx.typed_data(), static_cast<int64_t>(idx.element_count()), rows, start->typed_data(),
                 order->typed_data()))
    return ffi::Error::InvalidArgument("group_by_row: index out of range");
  return ffi::Error::Success();
}

ffi::Error ScatterOuterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::S32> start,
                            ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  if (auto e = CheckRank2(y.dimensions(), "y"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1], d = y.dimensions()[1];
  const int64_t n = out->dimensions()[0];
  if (auto e = CheckGroups(start, order, n, m * s); e.failure()) return e;
  const float* wp = w.typed_data();
  const float* yp = y.typed_data();
  float* op = out->typed_data();
  // Each row of the [N, d] result is written once, in order (zero rows included), instead of
  // read-modified-written at random per pair. The row is summed in a cache-resident buffer and
  // then written with non-temporal stores where the CPU has them: an ordinary store first reads
  // every line of the (N·d·4-byte, fresh) result from memory, which doubles its traffic.
  const int32_t* st = start.typed_data();
  const int32_t* ord = order.typed_data();
  ParallelFor(pool, n, 1024, [=](int64_t b, int64_t e) {
    std::vector<float> acc(d);
    for (int64_t r = b; r < e; ++r) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t q = st[r]; q < st[r + 1]; ++q) {
        const int64_t p = ord[q];
        Axpy(wp[p], yp + (p / s) * d, acc.data(), d);
      }
      StreamRow(acc.data(), op + r * d, d);
    }
    StreamFence();
  });
  return ffi::Error::Success();
}

ffi::Error GatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> table,
                         ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> order,
                         ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRank2(x.dimensions(), "x"); e.failure()) return e;
  if (auto e = CheckRank2(table.dimensions(), "table"); e.failure()) return e;
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1], d = x.dimensions()[1];
  const int64_t n = table.dimensions()[0];
  const float* xp = x.typed_data();
  const float* tp = table.typed_data();
  float* op = out->typed_data();
  if (auto e = CheckGroups(start, order, n, m * s); e.failure()) return e;
  const int32_t* st = start.typed_data();
  const int32_t* ord = order.typed_data();
  ParallelFor(pool, n, 1024, [=](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = tp + r * d;
      for (int64_t q = st[r]; q < st[r + 1]; ++q) {
        const int64_t p = ord[q];
        op[p] = Dot(xp + (p / s) * d, row, d);
      }
    }
  });
  return ffi::Error::Success();
}

// Runs fn(acc, begin, end) over [0, n) in `chunks` ranges, where acc is that chunk's accumulator
// of `size` floats: `out` itself (zeroed) for chunk 0, a private zeroed buffer for the others,
// added into `out` in chunk order at the end (so the sums do not depend on the threads).
template <typename Fn>
void AccumulateChunks(ffi::ThreadPool& pool, int64_t n, int64_t chunks, float* out, int64_t size, Fn fn) {
  std::vector<std::vector<float>> priv(chunks > 1 ? chunks - 1 : 0);
  std::memset(out, 0, sizeof(float) * size);
  ParallelForT(pool, n, chunks, [&](int64_t c, int64_t b, int64_t e) {
    float* acc = out;
    if (c > 0) {
      priv[c - 1].assign(size, 0.f);
      acc = priv[c - 1].data();
    }
    fn(acc, b, e);
  });
  if (priv.empty()) return;
  ParallelFor(pool, size, 4096, [&](int64_t b, int64_t e) {
    for (auto& buf : priv)
      if (!buf.empty()) Axpy(1.f, buf.data() + b, out + b, e - b);
  });
}

ffi::Error EmbeddingBagImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx,
                            ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRank2(table.dimensions(), "table"); e.failure()) return e;
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1], d = table.dimensions()[1];
  const int64_t n = table.dimensions()[0];
  const float* tp = table.typed_data();
  const float* wp = w.typed_data();
  if (auto e = CheckGroups(start, order, n, m * s); e.failure()) return e;
  const int32_t* st = start.typed_data();
  const int32_t* ord = order.typed_data();
  // Chunks of table rows; the token-indexed output is accumulated per chunk.
  const int64_t chunks = ChunksFor(pool, n, 1024);
  AccumulateChunks(pool, n, chunks, out->typed_data(), m * d, [=](float* acc, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = tp + r * d;
      for (int64_t q = st[r]; q < st[r + 1]; ++q) {
        const int64_t p = ord[q];
        Axpy(wp[p], row, acc + (p / s) * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

// Token-centric embedding_bag and scatter_outer for tables small enough to stay in cache (the
// product-key sub-key tables: sqrt(N) rows of d_key/2 floats, times the heads when the keys are
// per head). Grouping the pairs by row would cost more than it saves there: the table rows are
// cache hits anyway, and walking the tokens in order reads and writes the token side once, in
// order. Both check the indices first.
ffi::Error CheckIndices(const int32_t* idx, int64_t pairs, int64_t rows) {
  for (int64_t p = 0; p < pairs; ++p)
    if (idx[p] < 0 || idx[p] >= rows) return ffi::Error::InvalidArgument("index out of range");
  return ffi::Error::Success();
}

ffi::Error BagSmallImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::S32> idx,
                        ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRank2(table.dimensions(), "table"); e.failure()) return e;
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1], d = table.dimensions()[1];
  const int64_t n = table.dimensions()[0];
  const int32_t* ip = idx.typed_data();
  if (auto e = CheckIndices(ip, m * s, n); e.failure()) return e;
  const float* tp = table.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, m, 64, [=](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* orow = op + t * d;
      std::fill(orow, orow + d, 0.f);
      for (int64_t j = 0; j < s; ++j) Axpy(wp[t * s + j], tp + ip[t * s + j] * d, orow, d);
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterSmallImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  if (auto e = CheckRank2(y.dimensions(), "y"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1], d = y.dimensions()[1];
  const int64_t n = out->dimensions()[0];
  const int32_t* ip = idx.typed_data();
  if (auto e = CheckIndices(ip, m * s, n); e.failure()) return e;
  const float* wp = w.typed_data();
  const float* yp = y.typed_data();
  float* op = out->typed_data();
  // Chunks of tokens; the row-indexed output (small) is accumulated per chunk.
  AccumulateChunks(pool, m, ChunksFor(pool, m, 256), op, n * d, [=](float* acc, int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t j = 0; j < s; ++j) Axpy(wp[t * s + j], yp + t * d, acc + ip[t * s + j] * d, d);
  });
  return ffi::Error::Success();
}

// Token-centric kernels for a decode step (few tokens, any table size; float32 or bfloat16
// tables): each (token, slot) pair reads its table row straight from the table, contiguously,
// with no grouping of the pairs by row. Grouping costs a counting sort over all N rows per call,
// which dominates when the tokens read only M·S << N rows. Both check the indices first.
//
//   decode_gather_dot(x[M,d], T[N,d], idx[M,S]) -> out[M,S]
//   decode_bag(T[N,d], idx[M,S], w[M,S])        -> out[M,d]

template <typename T>
void DecodeGatherDot(ffi::ThreadPool& pool, const float* xp, const T* tp, const int32_t* ip, int64_t m, int64_t s,
                     int64_t d, float* op) {
  // Chunks of pairs: at batch 1 the h·k pairs of the one token are split over the threads.
  ParallelFor(pool, m * s, 8, [=](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) op[p] = Dot(xp + (p / s) * d, tp + ip[p] * d, d);
  });
}

template <typename T>
void DecodeBag(ffi::ThreadPool& pool, const T* tp, const int32_t* ip, const float* wp, int64_t m, int64_t s,
               int64_t d, float* op) {
  // Work items are (token, column block): with fewer tokens than threads (batch 1) each token's
  // columns are split, every thread then reading its slice of all S rows. Blocks are multiples
  // of 16 columns (whole 64-byte lines of a float32 output row) and every output element has
  // one writer, summing the slots in order: deterministic.
  const int64_t workers = Workers(pool);
  const int64_t blocks = std::max<int64_t>(1, std::min((workers + m - 1) / m, d / 64));
  const int64_t width = ((d + blocks - 1) / blocks + 15) / 16 * 16;
  ParallelFor(pool, m * blocks, 1, [=](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const int64_t t = q / blocks, c0 = std::min(d, (q % blocks) * width), c1 = std::min(d, c0 + width);
      float* orow = op + t * d + c0;
      std::fill(orow, orow + (c1 - c0), 0.f);
      for (int64_t j = 0; j < s; ++j) Axpy(wp[t * s + j], tp + ip[t * s + j] * d + c0, orow, c1 - c0);
    }
  });
}

ffi::Error CheckTable(const ffi::AnyBuffer& table) {
  if (auto e = CheckRank2(table.dimensions(), "table"); e.failure()) return e;
  if (table.element_type() != ffi::DataType::F32 && table.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("table must be float32 or bfloat16");
  return ffi::Error::Success();
}

ffi::Error DecodeGatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer table,
                               ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckRank2(x.dimensions(), "x"); e.failure()) return e;
  if (auto e = CheckTable(table); e.failure()) return e;
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1], d = x.dimensions()[1];
  const int64_t n = table.dimensions()[0];
  if (table.dimensions()[1] != d || x.dimensions()[0] != m)
    return ffi::Error::InvalidArgument("decode_gather_dot: x [M, d], table [N, d], idx [M, S] do not match");
  const int32_t* ip = idx.typed_data();
  if (auto e = CheckIndices(ip, m * s, n); e.failure()) return e;
  if (table.element_type() == ffi::DataType::F32)
    DecodeGatherDot(pool, x.typed_data(), static_cast<const float*>(table.untyped_data()), ip, m, s, d,
                    out->typed_data());
  else
    DecodeGatherDot(pool, x.typed_data(), static_cast<const uint16_t*>(table.untyped_data()), ip, m, s, d,
                    out->typed_data());
  return ffi::Error::Success();
}

ffi::Error DecodeBagImpl(ffi::ThreadPool pool, ffi::AnyBuffer table, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out) {
  if (auto e = CheckTable(table); e.failure()) return e;
  if (auto e = CheckRank2(idx.dimensions(), "idx"); e.failure()) return e;
  const int64_t m = idx.dimensions()[0], s = idx.dimensions()[1];
  const int64_t n = table.dimensions()[0], d = table.dimensions()[1];
  if (static_cast<int64_t>(w.element_count()) != m * s)
    return ffi::Error::InvalidArgument("decode_bag: w must have the shape of idx [M, S]");
  const int32_t* ip = idx.typed_data();
  if (auto e = CheckIndices(ip, m * s, n); e.failure()) return e;
  if (table.element_type() == ffi::DataType::F32)
    DecodeBag(pool, static_cast<const float*>(table.untyped_data()), ip, w.typed_data(), m, s, d, out->typed_data());
  else
    DecodeBag(pool, static_cast<const uint16_t*>(table.untyped_data()), ip, w.typed_data(), m, s, d,
              out->typed_data());
  return ffi::Error::Success();
}

// Top-k of one row in descending order; among equal values the lower index comes first (as
// jax.lax.top_k).
//
// First a lower bound on the k-th largest value: split the row into blocks of floor(n/k)
// elements (so there are at least k blocks) and take the smallest block maximum. At least k
// elements are >= it, so an element below it is in no top-k. The elements >= bound (~48 of 256
// for k = 16 on random scores) are collected branch-free, in index order. For k <= 16 (32) they
// are then inserted into a sorted 16-lane (32-lane) buffer held in two (four) 8-float vectors,
// plus as many of indices: each insertion is a compare, a one-lane shift and two blends per
// vector, with no data-dependent branch
// (an earlier candidate stays ahead of an equal later one, which gives lax.top_k's tie order).
// This is faster than the previous scalar insertion, whose ~35 shifting insertions per row
// mispredicted, also when that runs over the collected candidates only (docs/peer_speed.md). Larger
// k than 32, or a row whose bound is not above -inf (or is NaN), take the scalar insertion.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define PEER_JAX_SHUFFLE 1
typedef int32_t I8 __attribute__((vector_size(32)));

// The sorted buffer is L vectors (8·L lanes: L = 2 for k <= 16, 4 for k <= 32). Vector j's
// shifted copy takes its lane 0 from lane 7 of vector j - 1.
template <int L>
inline void InsertTopV(const float* cand, const int32_t* cpos, int64_t c, int64_t k, float* val, int32_t* pos) {
  const float lo = -__builtin_inff();
  F8 t[L];  // values, descending over the 8·L lanes
  I8 p[L];  // their indices
  for (int j = 0; j < L; ++j) {
    t[j] = F8{} + lo;
    p[j] = I8{};
  }
  const I8 ones = {-1, -1, -1, -1, -1, -1, -1, -1};
  for (int64_t q = 0; q < c; ++q) {
    const F8 x = cand[q] - F8{};
    const I8 ix = cpos[q] + I8{};
    I8 keep[L];
    for (int j = 0; j < L; ++j) keep[j] = t[j] >= x;  // lanes that stay where they are
    // Lanes right after the last kept one receive x; the lanes after that take their left
    // neighbour (the buffer shifted by one lane, the last value dropping out). Right to left,
    // so each vector is shifted from its neighbour's old value.
    for (int j = L - 1; j >= 0; --j) {
      const I8 here = j ? __builtin_shufflevector(keep[j - 1], keep[j], 7, 8, 9, 10, 11, 12, 13, 14)
                        : __builtin_shufflevector(ones, keep[0], 0, 8, 9, 10, 11, 12, 13, 14);
      const F8 sv = j ? __builtin_shufflevector(t[j - 1], t[j], 7, 8, 9, 10, 11, 12, 13, 14)
                      : __builtin_shufflevector(t[0], t[0], 0, 0, 1, 2, 3, 4, 5, 6);
      const I8 sp = j ? __builtin_shufflevector(p[j - 1], p[j], 7, 8, 9, 10, 11, 12, 13, 14)
                      : __builtin_shufflevector(p[0], p[0], 0, 0, 1, 2, 3, 4, 5, 6);
      t[j] = keep[j] ? t[j] : (here ? x : sv);
      p[j] = keep[j] ? p[j] : (here ? ix : sp);
    }
  }
  float tv[8 * L];
  int32_t tp[8 * L];
  std::memcpy(tv, t, sizeof(t));
  std::memcpy(tp, p, sizeof(p));
  std::copy(tv, tv + k, val);
  std::copy(tp, tp + k, pos);
}
#endif

// Copies the elements >= bound (and their positions) to the front of cand / cpos, in order;
// returns their count. With AVX2, eight at a time: a compare, a movemask and a permutation from
// a 256-entry table compress them in one store (faster than a branch-free scalar append; see
// docs/peer_speed.md). May write up to 8 elements past the
// count.
#ifdef __AVX2__
struct CompressTable {
  alignas(32) int32_t perm[256][8];
  CompressTable() {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) perm[m][c++] = b;
      while (c < 8) perm[m][c++] = 0;
    }
  }
};
const CompressTable kCompress;
#endif

inline int64_t CollectAtLeast(const float* v, int64_t n, float bound, float* cand, int32_t* cpos) {
  int64_t c = 0, i = 0;
#ifdef __AVX2__
  const __m256 b = _mm256_set1_ps(bound);
  __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(x, b, _CMP_GE_OQ));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.perm[m]));
    _mm256_storeu_ps(cand + c, _mm256_permutevar8x32_ps(x, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cpos + c), _mm256_permutevar8x32_epi32(at, perm));
    c += __builtin_popcount(m);
    at = _mm256_add_epi32(at, _mm256_set1_epi32(8));
  }
#endif
  for (; i < n; ++i) {
    cand[c] = v[i];
    cpos[c] = static_cast<int32_t>(i);
    c += v[i] >= bound;
  }
  return c;
}

// `cand` and `cpos` are scratch of n + 8 elements.
inline void RowTopK(const float* v, int64_t n, int64_t k, float* val, int32_t* pos, float* cand, int32_t* cpos) {
  const int64_t bs = n / k;  // >= 1 since k <= n; ceil(n / bs) >= k blocks
  float bound = v[0];
  for (int64_t b = 0; b < n; b += bs) {
    const int64_t e = std::min(n, b + bs);
    float m = v[b];
#pragma omp simd reduction(max : m)
    for (int64_t i = b; i < e; ++i) m = v[i] > m ? v[i] : m;
    bound = b == 0 ? m : std::min(bound, m);
  }
#ifdef PEER_JAX_SHUFFLE
  if (k <= 32 && bound > -__builtin_inff()) {
    const int64_t c = CollectAtLeast(v, n, bound, cand, cpos);
    if (k <= 16)
      InsertTopV<2>(cand, cpos, c, k, val, pos);
    else
      InsertTopV<4>(cand, cpos, c, k, val, pos);
    return;
  }
#endif
  int64_t filled = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[i];
    if (x < bound || (filled == k && !(x > val[k - 1]))) continue;
    int64_t j = filled < k ? filled++ : k - 1;
    while (j > 0 && x > val[j - 1]) {
      val[j] = val[j - 1];
      pos[j] = pos[j - 1];
      --j;
    }
    val[j] = x;
    pos[j] = static_cast<int32_t>(i);
  }
}

// Product-key top-k from the two halves' scores s1, s2 [R, n] (R = tokens x heads): the top-k
// of each half, the candidate sums s1[a_i] + s2[b_j] over the pairs (i+1)(j+1) <= k (in the
// order i, then j: product_keys.candidate_pairs), and the top-k of those. Outputs the scores
// [R, k] and the item indices a*n + b [R, k]; identical to product_keys' XLA path.
ffi::Error ProductKeyTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> s1, ffi::Buffer<ffi::F32> s2, int64_t k,
                              ffi::ResultBuffer<ffi::F32> scores, ffi::ResultBuffer<ffi::S32> items) {
  if (auto e = CheckRank2(s1.dimensions(), "s1"); e.failure()) return e;
  const int64_t r = s1.dimensions()[0], n = s1.dimensions()[1];
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("product_key_topk: need 1 <= k <= n");
  std::vector<int32_t> ci, cj;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k / (i + 1); ++j) {
      ci.push_back(static_cast<int32_t>(i));
      cj.push_back(static_cast<int32_t>(j));
    }
  const int64_t nc = static_cast<int64_t>(ci.size());
  const float* p1 = s1.typed_data();
  const float* p2 = s2.typed_data();
  float* so = scores->typed_data();
  int32_t* io = items->typed_data();
  ParallelFor(pool, r, 64, [&](int64_t b, int64_t e) {
    std::vector<float> v1(k), v2(k), cand(nc), vk(k), scratch(std::max(n, nc) + 8);
    std::vector<int32_t> a1(k), a2(k), pk(k), spos(std::max(n, nc) + 8);
    for (int64_t row = b; row < e; ++row) {
      RowTopK(p1 + row * n, n, k, v1.data(), a1.data(), scratch.data(), spos.data());
      RowTopK(p2 + row * n, n, k, v2.data(), a2.data(), scratch.data(), spos.data());
      for (int64_t c = 0; c < nc; ++c) cand[c] = v1[ci[c]] + v2[cj[c]];
      RowTopK(cand.data(), nc, k, vk.data(), pk.data(), scratch.data(), spos.data());
      for (int64_t j = 0; j < k; ++j) {
        so[row * k + j] = vk[j];
        io[row * k + j] = a1[ci[pk[j]]] * static_cast<int32_t>(n) + a2[cj[pk[j]]];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxProductKeyTopK, ProductKeyTopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxGroupByRow, GroupByRowImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxGatherDot, GatherDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxEmbeddingBag, EmbeddingBagImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxBagSmall, BagSmallImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxScatterSmall, ScatterSmallImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxScatterOuter, ScatterOuterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxDecodeGatherDot, DecodeGatherDotImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxDecodeBag, DecodeBagImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
