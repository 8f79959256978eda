// Attention of one new token per row over its key/value cache, on CPUs with AVX512 or AVX2: a decoding step's
// attention.
//
// Written out in PyTorch, a compiled step of 8 rows of SmolLM2 converted each layer's whole bf16 cache to fp32 before
// its two small products: the step took 12.7-15.8 ms, and 8.7-9.9 with attention left out. Here each
// (row, key/value head) reads its keys and values once, in bf16 or fp32, and computes in fp32: the scores of the
// query heads that share them, their softmax, and the weighted sum of the values. The algorithm is in attention.h,
// once; each set of instructions below gives it vectors of its width (16 lanes, or 8) and their operations.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vectors.h"

namespace {

constexpr float MINUS_INF = -std::numeric_limits<float>::infinity();

constexpr int64_t padded(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Keys and values are read once per step, from memory rather than a cache (the weights read between two layers'
// attention push them out), so each is asked for AHEAD rows before it is used. SmolLM2 in int4, compiled, machine C:
// 8 rows decoded 10 % faster and one row 3 % (medians of 6 alternated pairs of processes); 32 and 64 ahead: no better.
constexpr int AHEAD = 16;

template <int D, typename T>
inline void prefetch_row(const T* p) {  // the D values of one key or value, a cache line at a time
  for (size_t b = 0; b < D * sizeof(T); b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

template <typename T>
using Heads = void (*)(const float*, const T*, const T*, int64_t, int64_t, const bool*, int64_t, int64_t, float*,
                       float*, float*);

namespace avx512 {
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
using V = __m512;
constexpr int W = 16, SUMS = 16;  // lanes; of the 32 registers, those a head's sums may take in values_of

TARGET inline V load(const float* p) { return _mm512_loadu_ps(p); }
TARGET inline V load(const at::BFloat16* p) { return widen16(p); }
TARGET inline void store(float* p, V x) { _mm512_storeu_ps(p, x); }
TARGET inline V zero() { return _mm512_setzero_ps(); }
TARGET inline V set1(float x) { return _mm512_set1_ps(x); }
TARGET inline V add(V a, V b) { return _mm512_add_ps(a, b); }
TARGET inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
TARGET inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
TARGET inline V max(V a, V b) { return _mm512_max_ps(a, b); }
TARGET inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
TARGET inline V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
TARGET inline V times_pow2(V x, V n) { return _mm512_scalef_ps(x, n); }
TARGET inline V zero_where_minus_inf(V x, V y) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(MINUS_INF), _CMP_NEQ_OQ), y);
}
TARGET inline float reduce_max(V x) { return _mm512_reduce_max_ps(x); }
TARGET inline float reduce_add(V x) { return _mm512_reduce_add_ps(x); }

// 16 vectors to one whose lane j is the sum of a[j]'s lanes: four rounds of adding halves, then the lanes in order.
// Every lane is summed in the same order, so a key's score does not depend on where it falls in a block.
TARGET inline V sums(const V* a) {
  V b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  const V e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x44), _mm512_shuffle_ps(d[0], d[1], 0xEE));
  // lane 4k + m of e holds key 4m + k
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), e);
}

#include "attention.h"
#undef TARGET
}  // namespace avx512

namespace avx2 {
#define TARGET __attribute__((target("avx2,fma")))
using V = __m256;
constexpr int W = 8, SUMS = 12;  // of the 16 registers

TARGET inline V load(const float* p) { return _mm256_loadu_ps(p); }
TARGET inline V load(const at::BFloat16* p) { return widen8(p); }
TARGET inline void store(float* p, V x) { _mm256_storeu_ps(p, x); }
TARGET inline V zero() { return _mm256_setzero_ps(); }
TARGET inline V set1(float x) { return _mm256_set1_ps(x); }
TARGET inline V add(V a, V b) { return _mm256_add_ps(a, b); }
TARGET inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
TARGET inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
TARGET inline V max(V a, V b) { return _mm256_max_ps(a, b); }
TARGET inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
TARGET inline V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
TARGET inline V times_pow2(V x, V n) {  // n from -126 to 0 (exps' x <= 0): 2^n made from its exponent bits
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(x, _mm256_castsi256_ps(bits));
}
TARGET inline V zero_where_minus_inf(V x, V y) {
  return _mm256_and_ps(_mm256_cmp_ps(x, set1(MINUS_INF), _CMP_NEQ_OQ), y);
}
TARGET inline float reduce_max(V x) { return largest(x); }
TARGET inline float reduce_add(V x) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// 8 vectors to one whose lane j is the sum of a[j]'s lanes, every lane summed in the same order (as AVX512's)
TARGET inline V sums(const V* a) {
  V b[4], c[2];
  for (int i = 0; i < 4; ++i)  // halves added: a[2i]'s 4 sums in the low half, a[2i + 1]'s in the high one
    b[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm256_add_ps(_mm256_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm256_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  const V d = _mm256_add_ps(_mm256_shuffle_ps(c[0], c[1], 0x44), _mm256_shuffle_ps(c[0], c[1], 0xEE));
  // lane 4h + m of d holds a[2m + h]'s sum
  return _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

#include "attention.h"
#undef TARGET
}  // namespace avx2

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask, bool avx512,
            at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k.size(2), G = H / KV;
  const float* qs = q.data_ptr<float>();
  const T *ks = k.data_ptr<T>(), *vs = v.data_ptr<T>();
  float* ys = y.data_ptr<float>();
  // each row's keys from the block of 16 of its first unmasked one to its last: the columns a cache keeps free for
  // what comes next are not read (a fifth of a grown cache: 8 rows of SmolLM2 took 0.1-0.5 ms a step less). Whole
  // blocks are left out, so the keys kept fall in the same lanes (of 16 or 8) and every sum is taken as before, bit for
  // bit
  std::vector<int64_t> from(B, 0), to(B, S);
  for (int64_t b = 0; mask && b < B; ++b) {
    const bool* row = mask + b * S;
    while (to[b] > 0 && !row[to[b] - 1]) --to[b];
    while (from[b] + 16 < to[b] && std::none_of(row + from[b], row + from[b] + 16, [](bool x) { return x; }))
      from[b] += 16;
  }
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * padded(S, 16)), inv(G);
    const Heads<T> heads = (avx512 ? avx512::HEADS<T> : avx2::HEADS<T>)[D / 16 - 1];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, h = i % KV, first = (b * H + h * G) * D, n = to[b] - from[b];
      heads(qs + first, ks + b * k.stride(0) + h * k.stride(1) + from[b] * k.stride(2),
            vs + b * v.stride(0) + h * v.stride(1) + from[b] * v.stride(2), k.stride(2), v.stride(2),
            mask ? mask + b * S + from[b] : nullptr, n, G, scores.data(), inv.data(), ys + first);
    }
  });
}

// q (B, H, D) fp32, k and v (B, KV, S, D) bf16 or fp32 with D contiguous, mask (B, S) bool or none -> (B, H, D) fp32,
// with AVX512's instructions if avx512, else AVX2's
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, bool avx512) {
  TORCH_CHECK(avx512 ? __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl")
                     : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "this CPU lacks the instructions asked for: avx512 only where fournil.kernels.instructions() is 2");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous (B, H, D), fp32");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kFloat) && k.stride(3) == 1 &&
                  v.stride(3) == 1,
              "k, v: (B, KV, S, D) bf16 or fp32, D contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && H % KV == 0 && D % 16 == 0 && D <= 128,
              "q (B, H, D) and k (B, KV, S, D): H a multiple of KV, D a multiple of 16 up to 128");
  const bool* m = nullptr;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == B && mask->size(1) == S,
                "mask: contiguous (B, S) bool");
    m = mask->data_ptr<bool>();
  }
  auto y = at::empty({B, H, D}, q.options());
  if (k.scalar_type() == at::kBFloat16)
    attend<at::BFloat16>(q, k, v, m, avx512, y);
  else
    attend<float>(q, k, v, m, avx512, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fournil, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool avx512) -> Tensor");
}

TORCH_LIBRARY_IMPL(fournil, CPU, m) { m.impl("decode_attention", &decode_attention); }
