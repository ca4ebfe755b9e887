// Stand-alone timing of the CPU kernel core (gemv.h), without XLA: one packed weight of random
// blocks times M rows, rows split over T std::threads, next to a plain read of 2 GiB.
//
//   g++ -O3 -march=native -std=c++17 -pthread bench.cc -o /tmp/ds4_bench
//   /tmp/ds4_bench QTYPE N K M [THREADS=2] [REPS=20]     (QTYPE: the GGML id, e.g. 8 = Q8_0)
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <ctime>

#include "gemv.h"

namespace ds4 {
uint8_t g_iq2xxs_grid[256][8];
uint8_t g_iq2xxs_biased[256][8];
}

using Clock = std::chrono::steady_clock;

double cpu_s() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

template <class F>
void parallel(int threads, int64_t n, F&& body) {
  std::atomic<int64_t> next{0};
  auto run = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) body(i);
  };
  std::vector<std::thread> ts;
  for (int t = 1; t < threads; ++t) ts.emplace_back(run);
  run();
  for (auto& t : ts) t.join();
}

int main(int argc, char** argv) {
  if (argc < 5) { std::fprintf(stderr, "usage: QTYPE N K M [THREADS] [REPS]\n"); return 2; }
  int q = std::atoi(argv[1]);
  int64_t n = std::atoll(argv[2]), k = std::atoll(argv[3]);
  int m = std::atoi(argv[4]), threads = argc > 5 ? std::atoi(argv[5]) : 2;
  int reps = argc > 6 ? std::atoi(argv[6]) : 20;
  if (const char* pf = std::getenv("PF")) ds4::g_prefetch = std::atoi(pf);
  std::mt19937_64 rng(1);
  for (auto& row : ds4::g_iq2xxs_grid) for (auto& v : row) v = "\x08\x19\x2b"[rng() % 3];
  for (int i = 0; i < 256; ++i)
    for (int j = 0; j < 8; ++j) ds4::g_iq2xxs_biased[i][j] = uint8_t(ds4::g_iq2xxs_grid[i][j] + 128);
  int64_t b = k / ds4::block_elems(q);
  std::vector<int64_t> sizes;  // bytes per row of each plane
  switch (q) {
    case ds4::kQ8_0: sizes = {2 * b, 32 * b}; break;
    case ds4::kQ2_K: sizes = {16 * b, 64 * b, 2 * b, 2 * b}; break;
    case ds4::kQ4_K: sizes = {2 * b, 2 * b, 12 * b, 128 * b}; break;
    case ds4::kIQ2_XXS: sizes = {2 * b, 32 * b, 32 * b}; break;
    case ds4::kMXFP4: sizes = {b, 16 * b}; break;
    default: sizes = {2 * k};
  }
  ds4::Weight w;
  w.qtype = q; w.np = int(sizes.size()); w.k = k; w.deq = ds4::deq_fn(q);
  std::vector<std::vector<uint8_t>> planes(sizes.size());
  int64_t total = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    planes[i].resize(size_t(sizes[i] * n));
    for (auto& v : planes[i]) v = uint8_t(rng());
    w.base[i] = planes[i].data();
    w.row_bytes[i] = sizes[i];
    total += sizes[i] * n;
  }
  // Sane f16 scales (0x2000 ~ 0.0078) where a plane is one f16 per block.
  for (size_t i = 0; i < sizes.size(); ++i)
    if (sizes[i] == 2 * b && q != ds4::kF16 && q != ds4::kBF16)
      for (int64_t j = 0; j < n * b; ++j) reinterpret_cast<uint16_t*>(planes[i].data())[j] = 0x2000;
  // x 64-byte aligned, as XLA's buffers are (a split-line load costs two).
  std::vector<float> xs(size_t(m * k + 16)), y(size_t(m * n));
  float* x = xs.data() + (64 - reinterpret_cast<uintptr_t>(xs.data()) % 64) % 64 / 4;
  for (int64_t i = 0; i < m * k; ++i) x[i] = float(int(rng() % 2001) - 1000) / 1000.0f;
  std::vector<ds4::Group> groups(1);
  bool q8 = std::getenv("Q8") && std::atoi(std::getenv("Q8")) && ds4::has_int8_kernel(q);
  int64_t stride = q8 ? ds4::Act8::stride(k) / 4 : k;
  std::vector<float> xq(size_t(m * stride + 16));
  float* xb = x;
  if (q8) {
    w.q8 = true;
    auto base = reinterpret_cast<uint8_t*>(xq.data());
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
    for (int i = 0; i < m; ++i) ds4::quantize_row(x + i * k, k, base + i * stride * 4, nullptr, q);
    xb = reinterpret_cast<float*>(base);
  }
  for (int i = 0; i < m; ++i) { groups[0].x.push_back(xb + i * stride); groups[0].y.push_back(y.data() + i * n); }
  groups[0].wrow = 0;
  auto tasks = ds4::plan_tasks(w, threads, n, groups);
  std::vector<double> ts, cs;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    double c0 = cpu_s();
    parallel(threads, int64_t(tasks.size()), [&](int64_t i) { ds4::run_task(w, tasks[i]); });
    cs.push_back(cpu_s() - c0);
    ts.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(cs.begin(), cs.end());
  std::sort(ts.begin(), ts.end());
  double med = ts[ts.size() / 2];
  // Plain read of 2 GiB with the same threads.
  int64_t words = (int64_t(2) << 30) / 8;
  std::vector<uint64_t> big(size_t(words), 1);
  std::vector<double> rt, rc;
  std::atomic<uint64_t> sink{0};
  for (int r = 0; r < 5; ++r) {
    auto t0 = Clock::now();
    double c0 = cpu_s();
    int64_t chunks = 256, per = words / chunks;
    parallel(threads, chunks, [&](int64_t c) {
      uint64_t s = 0;
      for (int64_t i = c * per; i < (c + 1) * per; ++i) s += big[size_t(i)];
      sink += s;
    });
    rt.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    rc.push_back(cpu_s() - c0);
  }
  std::sort(rt.begin(), rt.end());
  std::sort(rc.begin(), rc.end());
  std::printf("%s qtype %d N %lld K %lld M %d: %.3f ms, %.2f GB/s packed, %.2f GB per CPU s "
              "(read 2 GiB: %.2f GB/s, %.2f GB per CPU s)\n", q8 ? "q8" : "exact", q, (long long)n, (long long)k, m, 1e3 * med,
              total / med / 1e9, total / cs[cs.size() / 2] / 1e9,
              (int64_t(2) << 30) / rt[rt.size() / 2] / 1e9, (int64_t(2) << 30) / rc[rc.size() / 2] / 1e9);
}
