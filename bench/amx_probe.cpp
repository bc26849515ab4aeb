// A probe of the library's two float32 product kernels on one product: the AVX-512 tiles
// (csrc/cpu/wide_float.h) against the AMX product (csrc/cpu/amx_float.h), speed and accuracy.
//
//     g++ -O3 -mavx2 -mfma -std=c++17 bench/amx_probe.cpp -o /tmp/amx_probe && /tmp/amx_probe [M N K]
//
// (the library's own flags, setup.py: with -O2 alone the tiles ran at a quarter of their speed).
//
// AMX multiplies bfloat16 (8 significant bits) into float32 sums. A float32 x is split exactly
// into three bfloat16s, x = hi + mid + lo (24 bits), and a product a·b kept to float32 accuracy as
// the six largest of the nine partial products, hi·hi + hi·mid + mid·hi + hi·lo + mid·mid + lo·hi
// (each exact in float32; the three left out are below 2^-24 relative). Six TDPBF16PS per 16x16x32
// block: at AMX's bfloat16 rate that is still more float32-equivalent work per cycle than two
// AVX-512 FMA units.
//
// Printed, one thread, in interleaved rounds (medians): C[M, N] = A[M, K] · W[N, K]ᵀ (the
// forward's x·W_ihᵀ) on the library's AVX-512 tiles (wide_rows_product, 6 x 4) and on its AMX
// product (2 x 2 tiles of 16 x 16 sums, the six products per 32 k), their ratio, and the
// largest error of each against float64 (next to a plain float32 FMA chain's). M is rounded down
// to a multiple of 32, N of 64, K of 32. Needs a CPU with AMX-BF16 and a kernel that grants AMX
// state (arch_prctl); says so and returns 2 otherwise.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../csrc/cpu/amx_float.h"
#include "../csrc/cpu/wide_float.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The library's AMX product (csrc/cpu/amx_float.h) on the same product: W split once, A per call.
struct AmxProduct {
  int M, N, K;
  size_t group;
  std::vector<uint16_t> b, a;
  std::vector<const uint16_t*> groups;
  std::vector<int64_t> offset, lanes;
  AmxProduct(const float* w, int M_, int N_, int K_)
      : M(M_), N(N_), K(K_), group(fused_rnn::cpu::amx_group_size(K_)), b(group * (N_ / 16)), a(group * (M_ / 16)) {
    for (int q = 0; q < N / 16; ++q) {
      fused_rnn::cpu::amx_split_columns(w + size_t(q) * 16 * K, K, 16, K, &b[q * group]);
      groups.push_back(&b[q * group]), offset.push_back(q * 16), lanes.push_back(16);
    }
  }
  void run(const float* x, float* c) {
    for (int g = 0; g < M / 16; ++g) {  // per call, as x changes
      const float* rows[16];
      for (int r = 0; r < 16; ++r) rows[r] = x + size_t(g * 16 + r) * K;
      fused_rnn::cpu::amx_split_rows(rows, 16, K, &a[g * group]);
    }
    fused_rnn::cpu::amx_product(a.data(), group, M, groups.data(), 0, offset.data(), lanes.data(), N / 16, K, nullptr,
                                false, c, N);
  }
};

// The library's kernel on the same product: W's panels (64 columns a block), every row per block.
struct TileProduct {
  int M, N, K;
  std::vector<float> panels;
  TileProduct(const float* w, int M_, int N_, int K_) : M(M_), N(N_), K(K_), panels(size_t(N_) * K_) {
    for (int u = 0; u < N / 64; ++u)
      for (int q = 0; q < 4; ++q) {
        const float* rows[16];
        for (int l = 0; l < 16; ++l) rows[l] = w + size_t(u * 64 + q * 16 + l) * K;
        fused_rnn::cpu::wide_transpose_rows(rows, 16, K, &panels[size_t(u) * K * 64 + q * 16], 64);
      }
  }
  void run(const float* a, float* c) const {
    const int64_t offset[4] = {0, 16, 32, 48}, lanes[4] = {16, 16, 16, 16};
    for (int u = 0; u < N / 64; ++u)
      fused_rnn::cpu::wide_rows_product(
          &panels[size_t(u) * K * 64], K, 64, 4, M, [&](int64_t r) { return a + r * K; },
          [&](int64_t r) { return c + r * N + u * 64; }, offset, lanes, nullptr, false);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int M = argc > 3 ? std::atoi(argv[1]) / 32 * 32 : 192, N = argc > 3 ? std::atoi(argv[2]) / 64 * 64 : 1024,
            K = argc > 3 ? std::atoi(argv[3]) / 32 * 32 : 512;
  if (M == 0 || N == 0 || K == 0) {
    std::printf("usage: amx_probe [M N K], M >= 32, N >= 64, K >= 32\n");
    return 1;
  }
  if (!fused_rnn::cpu::amx_granted()) {
    std::printf("no AMX-BF16 here, or the kernel does not grant its state\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1, 1);
  std::vector<float> a(size_t(M) * K), w(size_t(N) * K), c_tiles(size_t(M) * N), c_amx(size_t(M) * N);
  for (float& v : a) v = uniform(rng);
  for (float& v : w) v = 0.05f * uniform(rng);

  const TileProduct tiles(w.data(), M, N, K);
  AmxProduct amx(w.data(), M, N, K);
  std::vector<double> tile_s, amx_s, ratio;
  for (int round = 0; round < 15; ++round) {
    auto t0 = Clock::now();
    tiles.run(a.data(), c_tiles.data());
    const double t_tiles = seconds_since(t0);
    t0 = Clock::now();
    amx.run(a.data(), c_amx.data());
    const double t_amx = seconds_since(t0);
    tile_s.push_back(t_tiles), amx_s.push_back(t_amx), ratio.push_back(t_tiles / t_amx);
  }
  const double flop = 2.0 * M * N * K;
  std::printf("C[%d, %d] = A[%d, %d]·Wᵀ, one thread, 15 interleaved rounds (medians):\n", M, N, M, K);
  std::printf("  AVX-512 tiles (6 x 4)        %8.3f ms  %6.1f Gflop/s\n", median(tile_s) * 1e3, flop / median(tile_s) / 1e9);
  std::printf("  AMX, 6 bf16 products (2 x 2) %8.3f ms  %6.1f Gflop/s float32-equivalent (A's split included)\n",
              median(amx_s) * 1e3, flop / median(amx_s) / 1e9);
  std::printf("  AMX / tiles speed: %.2fx (per-round ratios, median)\n", median(ratio));

  double err_tiles = 0, err_amx = 0, err_chain = 0, largest = 0;
  long tile_differs_from_chain = 0;
  for (int i = 0; i < M; i += 3)
    for (int j = 0; j < N; j += 7) {
      double exact = 0;
      float chain = 0;
      for (int k = 0; k < K; ++k) {
        exact += double(a[size_t(i) * K + k]) * w[size_t(j) * K + k];
        chain = std::fma(a[size_t(i) * K + k], w[size_t(j) * K + k], chain);
      }
      err_tiles = std::max(err_tiles, std::abs(c_tiles[size_t(i) * N + j] - exact));
      tile_differs_from_chain += c_tiles[size_t(i) * N + j] != chain;
      err_amx = std::max(err_amx, std::abs(c_amx[size_t(i) * N + j] - exact));
      err_chain = std::max(err_chain, std::abs(chain - exact));
      largest = std::max(largest, std::abs(exact));
    }
  std::printf("  largest error against float64 (|C| up to %.2f): tiles %.2e, AMX %.2e, a float32 FMA chain %.2e\n",
              largest, err_tiles, err_amx, err_chain);
  // wide_float.h's promise: each output is one FMA chain over k in order, whichever tile computes it.
  std::printf("  tile outputs that differ from the FMA chain's bits: %ld\n", tile_differs_from_chain);
  return 0;
}
