// A probe, not part of the library: could AMX run the float32 products faster than the AVX-512
// tiles (csrc/cpu/wide_float.h) while staying as accurate as float32?
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
// forward's x·W_ihᵀ) on the library's AVX-512 tiles (wide_rows_product, 6 x 4) and on a 2 x 2
// AMX tile kernel (four 16x16 accumulators, the six products per 32 k), their ratio, and the
// largest error of each against float64 (next to a plain float32 FMA chain's). M is rounded down
// to a multiple of 32, N of 64, K of 32. Needs a CPU with AMX-BF16 and a kernel that grants AMX
// state (arch_prctl); says so and returns 2 otherwise.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../csrc/cpu/wide_float.h"

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw")))

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct TileConfig {  // palette 1: eight tiles of 16 rows x 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) bytes_per_row[t] = 64, rows[t] = 16;
  }
};

AMX_TARGET __m512 widen(__m256bh b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(b)), 16));
}

// 16 floats into their bfloat16 hi, mid, lo (each the rounded remainder of the one before).
AMX_TARGET void split16(__m512 x, __m256i* hi, __m256i* mid, __m256i* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  const __m512 r1 = _mm512_sub_ps(x, widen(h));
  const __m256bh m = _mm512_cvtneps_pbh(r1);
  const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(r1, widen(m)));
  *hi = reinterpret_cast<__m256i>(h), *mid = reinterpret_cast<__m256i>(m), *lo = reinterpret_cast<__m256i>(l);
}

// A [M, K] (M a multiple of 32, K of 32) as A tiles: per 16-row tile and 32-k block, the three
// planes' 16 x 32 bfloat16 side by side (3 KB).
AMX_TARGET std::vector<uint16_t> split_rows(const float* a, int M, int K) {
  std::vector<uint16_t> out(size_t(3) * M * K);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; k += 16) {
      __m256i h, mi, l;
      split16(_mm512_loadu_ps(a + size_t(m) * K + k), &h, &mi, &l);
      const size_t at = size_t(m / 16) * 3 * 16 * K + size_t(k / 32) * 1536 + (m % 16) * 32 + k % 32;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[at]), h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[at + 512]), mi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[at + 1024]), l);
    }
  return out;
}

// W [N, K] (rows = output columns) as B tiles: per 16 columns and 32-k block, the three planes'
// 16 pairs of k x 16 columns (VNNI order: k pairs interleaved), side by side.
AMX_TARGET std::vector<uint16_t> split_columns(const float* w, int N, int K) {
  std::vector<uint16_t> out(size_t(3) * N * K);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; k += 16) {
      __m256i planes[3];
      split16(_mm512_loadu_ps(w + size_t(n) * K + k), &planes[0], &planes[1], &planes[2]);
      for (int p = 0; p < 3; ++p) {
        uint16_t v[16];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(v), planes[p]);
        for (int i = 0; i < 16; ++i) {
          const int kk = k + i;
          out[size_t(n / 16) * 3 * 16 * K + size_t(kk / 32) * 1536 + p * 512 + (kk % 32) / 2 * 32 + (n % 16) * 2 + kk % 2] = v[i];
        }
      }
    }
  return out;
}

// C[32 x 32] = the six products over all K, for A tiles a0 (rows 0-15; a0 + 48K: rows 16-31)
// and B tiles b0, b1 (columns 0-15, 16-31). The order of the partial products reuses the tiles
// loaded last (14 loads per 24 TDPBF16PS).
AMX_TARGET void block_2x2(const uint16_t* a0, const uint16_t* b0, const uint16_t* b1, int K, float* c, int ldc) {
  const uint16_t* a1 = a0 + size_t(48) * K;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int k = 0; k < K; k += 32) {
    const size_t at = size_t(k / 32) * 1536;
#define FOUR_PRODUCTS _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
#define LOAD_A(p) _tile_loadd(4, a0 + at + (p) * 512, 64); _tile_loadd(5, a1 + at + (p) * 512, 64);
#define LOAD_B(p) _tile_loadd(6, b0 + at + (p) * 512, 64); _tile_loadd(7, b1 + at + (p) * 512, 64);
    LOAD_B(0) LOAD_A(2) FOUR_PRODUCTS  // lo·hi
    LOAD_A(1) FOUR_PRODUCTS            // mid·hi
    LOAD_B(1) FOUR_PRODUCTS            // mid·mid
    LOAD_A(0) FOUR_PRODUCTS            // hi·mid
    LOAD_B(2) FOUR_PRODUCTS            // hi·lo
    LOAD_B(0) FOUR_PRODUCTS            // hi·hi
#undef FOUR_PRODUCTS
#undef LOAD_A
#undef LOAD_B
  }
  _tile_stored(0, c, ldc * 4); _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4); _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

// C = A·Wᵀ: for each pair of 16-column blocks, every 32 rows (the pair's B tiles stay in L2).
AMX_TARGET void amx_product(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int M, int N, int K, float* c) {
  const TileConfig config;
  _tile_loadconfig(&config);
  for (int n = 0; n < N; n += 32)
    for (int m = 0; m < M; m += 32)
      block_2x2(&a[size_t(m / 16) * 48 * K], &b[size_t(n / 16) * 48 * K], &b[size_t(n / 16 + 1) * 48 * K], K,
                c + size_t(m) * N + n, N);
  _tile_release();
}

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
          &panels[size_t(u) * K * 64], K, 4, M, [&](int64_t r) { return a + r * K; },
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
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("amx-bf16") ||
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::printf("no AMX-BF16 here, or the kernel does not grant its state\n");
    return 2;
  }
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1, 1);
  std::vector<float> a(size_t(M) * K), w(size_t(N) * K), c_tiles(size_t(M) * N), c_amx(size_t(M) * N);
  for (float& v : a) v = uniform(rng);
  for (float& v : w) v = 0.05f * uniform(rng);

  const TileProduct tiles(w.data(), M, N, K);
  const std::vector<uint16_t> b_split = split_columns(w.data(), N, K);
  std::vector<double> tile_s, amx_s, ratio;
  for (int round = 0; round < 15; ++round) {
    auto t0 = Clock::now();
    tiles.run(a.data(), c_tiles.data());
    const double t_tiles = seconds_since(t0);
    t0 = Clock::now();
    const std::vector<uint16_t> a_split = split_rows(a.data(), M, K);  // per call, as x changes
    amx_product(a_split, b_split, M, N, K, c_amx.data());
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
