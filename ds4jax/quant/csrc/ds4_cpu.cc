// CPU kernels of quant.matmul / quant.expert_matmul (docs/design.md §8.1), as XLA FFI custom
// calls: packed GGML weights times a few f32 activation rows, every weight byte read and
// unpacked once per call whatever the number of rows.
//
//   ds4_matmul:        x f32[M, K], planes of w [N, ...]              -> y f32[M, N]
//   ds4_expert_matmul: x f32[P, K], e int32[P], planes of w [E, N, ...] -> y f32[P, N]
//                      (row p times expert e[p]; rows with e outside [0, E) give 0)
//
// A weight row is cut into 256-element chunks; each chunk's exact values (avx512.h) are
// multiplied into M vector accumulators (FMA), so the products are the exact products of the
// dequantised weights and x, and only the summation order differs from a dot. Rows of the weight are split over the XLA intra-op thread pool.
// Activations with more than kMaxRows rows go through the weights in slices of kMaxRows
// (the Python side sends long chunks to dequantise-then-dot instead).
//
// act = 1 ("q8") quantises each 32-element block of x to int8 (scale amax / 127, round half
// to even: quant.matmul.quantize_act) once per call, in the layout the weight type's kernel
// reads; Q8_0, IQ2_XXS and Q2_K then multiply with integer dot products (q8.h), the other
// types multiply the rounded values as floats.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "gemv.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace ds4 {

uint8_t g_iq2xxs_grid[256][8];
uint8_t g_iq2xxs_biased[256][8];

// body(i) for i < n on the calling thread plus up to num_threads - 1 pool tasks. A task that
// starts after all items are claimed touches nothing but the shared counters, so the caller
// only waits for claimed items: no deadlock when the pool is busy.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F& body) {
  int64_t nt = std::min<int64_t>(pool.num_threads(), n);
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  F* fp = &body;
  auto run = [st, n, fp]() {
    for (int64_t i; (i = st->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*fp)(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < nt; ++t) {
    auto copy = run;
    pool.Schedule(std::move(copy));
  }
  run();
  for (int spins = 0; st->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins > 1000) std::this_thread::yield();
  }
}

ffi::Error make_weight(int64_t qtype, const ffi::RemainingArgs& planes, int64_t n_rows,
                       int64_t k, Weight* w) {
  w->qtype = int(qtype);
  w->np = n_planes(w->qtype);
  w->deq = deq_fn(w->qtype);
  w->k = k;
  if (!w->deq) return ffi::Error::InvalidArgument("ds4_cpu: unsupported GGML type");
  if (int64_t(planes.size()) != w->np)
    return ffi::Error::InvalidArgument("ds4_cpu: wrong number of weight planes");
  if (k % block_elems(w->qtype)) return ffi::Error::InvalidArgument("ds4_cpu: K not whole blocks");
  for (int i = 0; i < w->np; ++i) {
    auto b = planes.get<ffi::AnyBuffer>(i);
    if (!b.has_value()) return b.error();
    if (n_rows <= 0 || b->size_bytes() % n_rows)
      return ffi::Error::InvalidArgument("ds4_cpu: plane size is not rows x row bytes");
    w->base[i] = static_cast<const uint8_t*>(b->untyped_data());
    w->row_bytes[i] = int64_t(b->size_bytes()) / n_rows;
  }
  return ffi::Error::Success();
}

void run_groups(ffi::ThreadPool& pool, const Weight& w, int64_t n, std::vector<Group>& groups) {
  std::vector<Task> tasks = plan_tasks(w, std::max<int64_t>(1, pool.num_threads()), n, groups);
  auto body = [&](int64_t i) { run_task(w, tasks[i]); };
  parallel_for(pool, int64_t(tasks.size()), body);
}

// act = 1: x rows quantised once per call, as Act8 rows for the integer kernels (w->q8) or
// as the rounded floats for the others. Returns the rows the kernel reads (row i at
// base + i * stride floats).
const float* prepare_rows(int64_t act, Weight* w, const float* x, int64_t rows,
                          std::vector<float>* store, int64_t* stride) {
  int64_t k = w->k;
  *stride = k;
  if (act == 0) return x;
  if (k % 32) return nullptr;
  if (has_int8_kernel(w->qtype)) {
    w->q8 = true;
    *stride = Act8::stride(k) / 4;
    store->assign(size_t(rows * *stride + 16), 0.0f);
    auto base = reinterpret_cast<uint8_t*>(store->data());
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
    for (int64_t i = 0; i < rows; ++i) quantize_row(x + i * k, k, base + i * *stride * 4, nullptr, w->qtype);
    return reinterpret_cast<const float*>(base);
  }
  store->resize(size_t(rows * k));
  std::vector<uint8_t> scratch(size_t(Act8::stride(k)));
  for (int64_t i = 0; i < rows; ++i) quantize_row(x + i * k, k, scratch.data(), store->data() + i * k, w->qtype);
  return store->data();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs planes,
                  ffi::ResultBuffer<ffi::F32> y, int64_t qtype, int64_t act) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("ds4_matmul: x [M, K] and y [M, N] expected");
  if (act != 0 && act != 1) return ffi::Error::InvalidArgument("ds4_matmul: act is 0 or 1");
  int64_t m = xd[0], k = xd[1], n = yd[1];
  Weight w;
  if (auto err = make_weight(qtype, planes, n, k, &w); err.failure()) return err;
  if (m == 0 || n == 0) return ffi::Error::Success();
  std::vector<float> xq;
  int64_t stride;
  const float* xs = prepare_rows(act, &w, x.typed_data(), m, &xq, &stride);
  if (!xs) return ffi::Error::InvalidArgument("ds4_matmul: q8 needs K a multiple of 32");
  std::vector<Group> groups(1);
  groups[0].wrow = 0;
  for (int64_t i = 0; i < m; ++i) {
    groups[0].x.push_back(xs + i * stride);
    groups[0].y.push_back(y->typed_data() + i * n);
  }
  run_groups(pool, w, n, groups);
  return ffi::Error::Success();
}

ffi::Error ExpertMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> e,
                        ffi::RemainingArgs planes, ffi::ResultBuffer<ffi::F32> y,
                        int64_t qtype, int64_t act, int64_t n_experts) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0] || int64_t(e.element_count()) != xd[0])
    return ffi::Error::InvalidArgument("ds4_expert_matmul: x [P, K], e [P], y [P, N] expected");
  if (act != 0 && act != 1) return ffi::Error::InvalidArgument("ds4_expert_matmul: act is 0 or 1");
  int64_t p = xd[0], k = xd[1], n = yd[1];
  Weight w;
  if (auto err = make_weight(qtype, planes, n_experts * n, k, &w); err.failure()) return err;
  std::fill(y->typed_data(), y->typed_data() + p * n, 0.0f);
  if (p == 0 || n == 0) return ffi::Error::Success();
  std::vector<float> xq;
  int64_t stride;
  const float* xs = prepare_rows(act, &w, x.typed_data(), p, &xq, &stride);
  if (!xs) return ffi::Error::InvalidArgument("ds4_expert_matmul: q8 needs K a multiple of 32");
  std::vector<int> slot(size_t(n_experts), -1);
  std::vector<Group> groups;
  const int32_t* ep = e.typed_data();
  for (int64_t i = 0; i < p; ++i) {
    int32_t ei = ep[i];
    if (ei < 0 || ei >= n_experts) continue;
    if (slot[ei] < 0) {
      slot[ei] = int(groups.size());
      groups.push_back({int64_t(ei) * n, {}, {}});
    }
    groups[slot[ei]].x.push_back(xs + i * stride);
    groups[slot[ei]].y.push_back(y->typed_data() + i * n);
  }
  run_groups(pool, w, n, groups);
  return ffi::Error::Success();
}

}  // namespace ds4

XLA_FFI_DEFINE_HANDLER_SYMBOL(ds4_matmul, ds4::Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype")
                                  .Attr<int64_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ds4_expert_matmul, ds4::ExpertMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype")
                                  .Attr<int64_t>("act")
                                  .Attr<int64_t>("n_experts"));

extern "C" __attribute__((visibility("default"))) void ds4_set_iq2xxs_grid(const uint8_t* grid) {
  std::memcpy(ds4::g_iq2xxs_grid, grid, sizeof(ds4::g_iq2xxs_grid));
  for (int i = 0; i < 256; ++i)
    for (int j = 0; j < 8; ++j) ds4::g_iq2xxs_biased[i][j] = uint8_t(grid[8 * i + j] + 128);
}

extern "C" __attribute__((visibility("default"))) int ds4_avx512() { return DS4_AVX512; }
extern "C" __attribute__((visibility("default"))) int ds4_vnni() { return DS4_VNNI; }
extern "C" __attribute__((visibility("default"))) int ds4_amx() {
#if DS4_AMX
  return ds4::amx_ok();
#else
  return 0;
#endif
}
