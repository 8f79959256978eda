// Attention of one new token per row over its key/value cache, on CPUs with AVX512: a decoding step's attention.
//
// Written out in PyTorch, a compiled step of 8 rows of SmolLM2 converted each layer's whole bf16 cache to fp32 before
// its two small products: the step took 12.7-15.8 ms, and 8.7-9.9 with attention left out. Here each
// (row, key/value head) reads its keys and values once, in bf16 or fp32, and computes in fp32: the scores of the
// query heads that share them, their softmax, and the weighted sum of the values.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr float MINUS_INF = -std::numeric_limits<float>::infinity();

AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const at::BFloat16* p) {  // bf16 to fp32: the same bits, then 16 zero bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Keys and values are read once per step, from memory rather than a cache (the weights read between two layers'
// attention push them out), so each is asked for AHEAD rows before it is used. SmolLM2 in int4, compiled, machine C:
// 8 rows decoded 10 % faster and one row 3 % (medians of 6 alternated pairs of processes); 32 and 64 ahead: no better.
constexpr int AHEAD = 16;

template <int C, typename T>
inline void prefetch_row(const T* p) {  // the 16 * C values of one key or value, a cache line at a time
  for (int c = 0; c < C; c += 4 / sizeof(T)) _mm_prefetch(reinterpret_cast<const char*>(p + 16 * c), _MM_HINT_T0);
}

// e^x (x <= 0: a score minus the largest), as 2^n 2^f with |f| <= 1/2 and 2^f by its Taylor polynomial of degree 6
// (relative error below 1e-7); -inf (a masked key) gives exactly 0
AVX512 inline __m512 exp16(__m512 x) {
  const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(MINUS_INF), _CMP_NEQ_OQ);
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  for (float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                  6.931472028550421e-1f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(p, n));
}

// 16 vectors to one whose lane j is the sum of a[j]'s lanes: four rounds of adding halves, then the lanes in order.
// Every lane is summed in the same order, so a key's score does not depend on where it falls in a block.
AVX512 inline __m512 sums16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x44), _mm512_shuffle_ps(d[0], d[1], 0xEE));
  // lane 4k + m of e holds key 4m + k
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), e);
}

// scores[g][s] = q[g] . k[s] / sqrt(D), or -inf where the mask says no; 16 keys at a time, up to 8 query heads at a
// time (each key read once for them). C: head_dim / 16, so that a key stays in registers.
template <int C, typename T>
AVX512 void scores_of(const float* q, const T* k, int64_t key_stride, const bool* mask, int64_t S, int64_t G,
                      float* scores) {
  constexpr int D = 16 * C;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  alignas(64) float part[8 * 16 * 16];  // per head and key, the 16 partial sums of its dot product
  for (int64_t s = 0; s < S; s += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, S - s));
    __mmask16 keep = n == 16 ? 0xFFFF : (1u << n) - 1;
    for (int j = 0; mask && j < n; ++j)
      if (!mask[s + j]) keep &= ~(1u << j);
    for (int j = 0; j < 16 && s + AHEAD + j < S; ++j) prefetch_row<C>(k + (s + AHEAD + j) * key_stride);
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int heads = static_cast<int>(std::min<int64_t>(8, G - g0));
      for (int j = 0; j < 16; ++j) {
        __m512 key[C];
        for (int c = 0; c < C; ++c) key[c] = j < n ? load16(k + (s + j) * key_stride + 16 * c) : _mm512_setzero_ps();
        for (int g = 0; g < heads; ++g) {
          const float* qg = q + (g0 + g) * D;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), key[0]);
          for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * c), key[c], acc);
          _mm512_store_ps(part + (g * 16 + j) * 16, acc);
        }
      }
      for (int g = 0; g < heads; ++g) {
        __m512 a[16];
        for (int j = 0; j < 16; ++j) a[j] = _mm512_load_ps(part + (g * 16 + j) * 16);
        const __m512 row = _mm512_mask_mul_ps(_mm512_set1_ps(MINUS_INF), keep, sums16(a), scale);
        _mm512_mask_storeu_ps(scores + (g0 + g) * S + s, n == 16 ? 0xFFFF : (1u << n) - 1, row);
      }
    }
  }
}

// a row of S scores to e^(score - the largest) in place; returns 1 / their sum (0 if every key is masked)
AVX512 float softmax_row(float* row, int64_t S) {
  __m512 most = _mm512_set1_ps(MINUS_INF);
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 part = S - s >= 16 ? 0xFFFF : (1u << (S - s)) - 1;
    most = _mm512_max_ps(most, _mm512_mask_loadu_ps(_mm512_set1_ps(MINUS_INF), part, row + s));
  }
  const float m = _mm512_reduce_max_ps(most);
  if (m == MINUS_INF) {
    std::fill(row, row + S, 0.0f);
    return 0.0f;
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 part = S - s >= 16 ? 0xFFFF : (1u << (S - s)) - 1;
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(MINUS_INF), part, row + s),
                                         _mm512_set1_ps(m)));
    _mm512_mask_storeu_ps(row + s, part, e);
    total = _mm512_add_ps(total, e);
  }
  return 1.0f / _mm512_reduce_add_ps(total);
}

// out[g] = sum over s of weights[g][s] v[s], times inv[g]: P query heads at once, each row of values read once for them
template <int C, int P, typename T>
AVX512 void values_of(const float* weights, const T* v, int64_t value_stride, int64_t S, const float* inv, float* out) {
  constexpr int D = 16 * C;
  __m512 acc[P][C];
  for (int g = 0; g < P; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    if (s + AHEAD < S) prefetch_row<C>(v + (s + AHEAD) * value_stride);
    __m512 value[C];
    for (int c = 0; c < C; ++c) value[c] = load16(v + s * value_stride + 16 * c);
    for (int g = 0; g < P; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * S + s]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, value[c], acc[g][c]);
    }
  }
  for (int g = 0; g < P; ++g)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
}

// the G query heads that share one key/value head, for one row
template <int C, typename T>
AVX512 void heads(const float* q, const T* k, const T* v, int64_t key_stride, int64_t value_stride, const bool* mask,
                  int64_t S, int64_t G, float* scores, float* inv, float* out) {
  constexpr int D = 16 * C;
  scores_of<C>(q, k, key_stride, mask, S, G, scores);
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_row(scores + g * S, S);
  for (int64_t g = 0; g < G; g += 4) {
    const float *w = scores + g * S, *i = inv + g;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: values_of<C, 4>(w, v, value_stride, S, i, out + g * D); break;
      case 3: values_of<C, 3>(w, v, value_stride, S, i, out + g * D); break;
      case 2: values_of<C, 2>(w, v, value_stride, S, i, out + g * D); break;
      default: values_of<C, 1>(w, v, value_stride, S, i, out + g * D);
    }
  }
}

template <typename T>
using Heads = void (*)(const float*, const T*, const T*, int64_t, int64_t, const bool*, int64_t, int64_t, float*,
                       float*, float*);
template <typename T>
constexpr Heads<T> HEADS[8] = {heads<1, T>, heads<2, T>, heads<3, T>, heads<4, T>,
                               heads<5, T>, heads<6, T>, heads<7, T>, heads<8, T>};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask, at::Tensor& y) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k.size(2), G = H / KV;
  const float* qs = q.data_ptr<float>();
  const T *ks = k.data_ptr<T>(), *vs = v.data_ptr<T>();
  float* ys = y.data_ptr<float>();
  // each row's keys from the block of 16 of its first unmasked one to its last: the columns a cache keeps free for
  // what comes next are not read (a fifth of a grown cache: 8 rows of SmolLM2 took 0.1-0.5 ms a step less). Whole
  // blocks are left out, so the keys kept fall in the same lanes and every sum is taken as before, bit for bit
  std::vector<int64_t> from(B, 0), to(B, S);
  for (int64_t b = 0; mask && b < B; ++b) {
    const bool* row = mask + b * S;
    while (to[b] > 0 && !row[to[b] - 1]) --to[b];
    while (from[b] + 16 < to[b] && std::none_of(row + from[b], row + from[b] + 16, [](bool x) { return x; }))
      from[b] += 16;
  }
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * S), inv(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, h = i % KV, first = (b * H + h * G) * D, n = to[b] - from[b];
      HEADS<T>[D / 16 - 1](qs + first, ks + b * k.stride(0) + h * k.stride(1) + from[b] * k.stride(2),
                           vs + b * v.stride(0) + h * v.stride(1) + from[b] * v.stride(2), k.stride(2), v.stride(2),
                           mask ? mask + b * S + from[b] : nullptr, n, G, scores.data(), inv.data(), ys + first);
    }
  });
}

// q (B, H, D) fp32, k and v (B, KV, S, D) bf16 or fp32 with D contiguous, mask (B, S) bool or none -> (B, H, D) fp32
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask) {
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
    attend<at::BFloat16>(q, k, v, m, y);
  else
    attend<float>(q, k, v, m, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fournil, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor"); }

TORCH_LIBRARY_IMPL(fournil, CPU, m) { m.impl("decode_attention", &decode_attention); }
