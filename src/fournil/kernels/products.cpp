// Quantized weights (4- or 8-bit codes) times int8 activations, in integers, on CPUs with AVX512-VNNI or AVX2 (as
// llama.cpp multiplies its Q4_1 and Q8_0 blocks by Q8 activations).
//
// PyTorch's int4 and int8 CPU kernels convert the weights and multiply in fp32 or bf16: with a few rows (a batch
// decoding) that arithmetic, not reading the weights, sets their speed. Here each row's activations are quantized to
// int8 in groups of 32 inputs (one scale each, the weights' groups), and one VNNI instruction multiplies 64 weight
// codes by 64 activations and adds them into 16 int32 sums: four times the products of an fp32 instruction, exact.
// Without VNNI, AVX2's instructions do the same for 32 codes in two (below).
//
// Layout (made by int_quantize, below): the output rows in blocks of 16, one zmm lane each, and a block's
// groups of 32 inputs one after the other. A group holds, for every 4 inputs, lane i's 4 bytes of row i's codes
// (4-bit: inputs 0-3 of every 8 in the low nibbles, 4-7 in the high ones); a 4-bit group then the 16 rows' scales
// and their 16 zeros in bf16. A weight is (code - OFFSET) * scale + zero, OFFSET = 8 for 4 bits (PyTorch's int4
// convention), 128 for 8 bits (the codes unsigned, as VNNI wants them); 8-bit weights have one scale per output row
// (bf16, given beside) and no zero, so their groups are codes only, and a group's sums need one conversion and one
// product, not four operations.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "vectors.h"

namespace {

constexpr int GROUP = 32;
constexpr int ROWS = 8;  // activation rows per pass over a block of weights: 16 zmm accumulators of 32

template <int BITS>
constexpr int group_bytes() {  // a group of a block: 16 x 32 codes, then (4-bit) 16 scales and 16 zeros
  return 16 * GROUP * BITS / 8 + (BITS == 4 ? 2 * 16 * 2 : 0);
}

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

template <int R>
VNNI inline void multiply(__m512i* dot, __m512i codes, const int8_t* q, int64_t in) {  // 4 inputs of R rows
  for (int r = 0; r < R; ++r) {
    int32_t four;
    std::memcpy(&four, q + r * in, 4);
    dot[r] = _mm512_dpbusd_epi32(dot[r], codes, _mm512_set1_epi32(four));
  }
}

// rows[r] . weights of a block of 16 output rows, for up to ROWS rows (R known at compile time, so the sums stay in
// registers); the block's groups follow each other in memory, read once, asked for ahead of time (DRAM answers late).
// 4-bit: sum[r * groups + g], step times the sum of row r's codes in group g, for the zeros; 8-bit: sum[r], those of
// all its groups, for the offset, and the block's 16 scales.
template <int BITS, int R>
VNNI void block(const uint8_t* weights, const int8_t* q, const float* step, const float* sum,
                const at::BFloat16* scales, int64_t in, float* out, int64_t out_stride) {
  constexpr int BYTES = group_bytes<BITS>(), AHEAD = 8 * 320, CODES = 16 * GROUP * BITS / 8;
  const int64_t groups = in / GROUP;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 offset = _mm512_set1_ps(BITS == 4 ? 8 : 128);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* w = weights + g * BYTES;
    const int8_t* x = q + g * GROUP;
    for (int line = 0; line < BYTES; line += 64) _mm_prefetch((const char*)w + AHEAD + line, _MM_HINT_T0);
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    for (int p = 0; p < CODES / 64; ++p) {
      const __m512i v = _mm512_loadu_si512(w + p * 64);
      if constexpr (BITS == 4) {
        multiply<R>(dot, _mm512_and_si512(v, nibble), x + p * 8, in);
        multiply<R>(dot, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), x + p * 8 + 4, in);
      } else {
        multiply<R>(dot, v, x + p * 4, in);
      }
    }
    if constexpr (BITS == 4) {
      const auto* scale_zero = reinterpret_cast<const at::BFloat16*>(w + CODES);
      const __m512 s = widen16(scale_zero), l = _mm512_fnmadd_ps(offset, s, widen16(scale_zero + 16));
      for (int r = 0; r < R; ++r) {
        // with low = zero - OFFSET s: sum of (code s + low) (q step) = s step sum(code q) + low step sum(q)
        const __m512 d = _mm512_cvtepi32_ps(dot[r]);
        acc[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(step[r * groups + g])), acc[r]);
        acc[r] = _mm512_fmadd_ps(l, _mm512_set1_ps(sum[r * groups + g]), acc[r]);
      }
    } else {
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(step[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    // 8-bit: sum of (code - OFFSET) scale (q step) = scale (sum of step sum(code q) - OFFSET sum of step sum(q))
    if constexpr (BITS == 8)
      acc[r] = _mm512_mul_ps(widen16(scales), _mm512_fnmadd_ps(offset, _mm512_set1_ps(sum[r]), acc[r]));
    _mm512_storeu_ps(out + r * out_stride, acc[r]);
  }
}

// each group of 32 activations in 127 steps of its largest |x| (x / step rounded to the nearest, ties to even, as
// torch.round); sum: step times the sum of the codes, for the weights' zeros
VNNI void quantize(const float* x, int64_t groups, int8_t* q, float* step, float* sum) {
  for (int64_t i = 0; i < groups; ++i) {
    const __m512 a = _mm512_loadu_ps(x + i * GROUP), b = _mm512_loadu_ps(x + i * GROUP + 16);
    const float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float s = most / 127;
    const __m512 by = _mm512_set1_ps(s > 0 ? s : 1);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_div_ps(a, by)), qb = _mm512_cvtps_epi32(_mm512_div_ps(b, by));
    _mm_storeu_si128((__m128i*)(q + i * GROUP), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i*)(q + i * GROUP + 16), _mm512_cvtsepi32_epi8(qb));
    step[i] = s;
    sum[i] = s * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  }
}

// AVX2 (most laptops): the same layout, a block's 16 lanes in two halves of 8, side by side in one pass over the
// block's groups, so that each row's activations are broadcast once for both (with the step-by-step loop below,
// SmolLM2's compiled int4 step decoded 8 rows 1.13x faster, one row 1.17x (medians), than with a pass per half, the
// second from the L1 cache). Without VNNI, a product of 32 codes by 32 activations is two instructions, pairs of
// products summed in 16 bits (maddubs) then in 32 (madd): 4-bit codes (at most 15 x 127 x 2 a pair) are summed over a
// whole group in 16 bits first; 8-bit ones, whose pairs would overflow 16 bits unsigned, are made signed (code - 128)
// and multiplied by |x| with x's sign moved onto them, as llama.cpp does.
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256i four_bytes(const int8_t* p) {  // p's 4 bytes in every 32-bit lane
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm256_set1_epi32(four);
}

constexpr int ROWS_AVX2 = 4;  // 2 halves x 4 rows of integer sums in registers

template <int BITS, int R>
AVX2 void block_avx2(const uint8_t* weights, const int8_t* q, const float* step, const float* sum,
                     const at::BFloat16* scales, int64_t in, float* out, int64_t out_stride) {
  constexpr int BYTES = group_bytes<BITS>(), AHEAD = 8 * 320, CODES = 16 * GROUP * BITS / 8;
  const int64_t groups = in / GROUP;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
  __m256 acc[2][R];  // by half of the block's lanes
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* w = weights + g * BYTES;
    const int8_t* x = q + g * GROUP;
    for (int line = 0; line < BYTES; line += 64) _mm_prefetch((const char*)w + AHEAD + line, _MM_HINT_T0);
    __m256i dot[2][R];
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < R; ++r) dot[h][r] = _mm256_setzero_si256();
    // one step at a time: unrolled whole, GCC computed a group's every product first and kept them in memory
    // (SmolLM2's products for 8 rows took 1.12x longer on one core)
#pragma GCC unroll 1
    for (int p = 0; p < CODES / 64; ++p) {  // a row's 4 activations (4-bit: 8), broadcast once for both halves
      const __m256i v[2] = {_mm256_loadu_si256((const __m256i*)(w + p * 64)),
                            _mm256_loadu_si256((const __m256i*)(w + p * 64 + 32))};
      if constexpr (BITS == 4) {
        __m256i low[2], high[2];
        for (int h = 0; h < 2; ++h) {
          low[h] = _mm256_and_si256(v[h], nibble);
          high[h] = _mm256_and_si256(_mm256_srli_epi16(v[h], 4), nibble);
        }
        for (int r = 0; r < R; ++r) {
          const __m256i a = four_bytes(x + r * in + p * 8), b = four_bytes(x + r * in + p * 8 + 4);
          for (int h = 0; h < 2; ++h)
            dot[h][r] = _mm256_add_epi16(dot[h][r], _mm256_add_epi16(_mm256_maddubs_epi16(low[h], a),
                                                                     _mm256_maddubs_epi16(high[h], b)));
        }
      } else {
        const __m256i signed_codes[2] = {_mm256_xor_si256(v[0], flip), _mm256_xor_si256(v[1], flip)};
        for (int r = 0; r < R; ++r) {
          const __m256i a = four_bytes(x + r * in + p * 4), size = _mm256_abs_epi8(a);
          for (int h = 0; h < 2; ++h) {
            const __m256i pairs = _mm256_maddubs_epi16(size, _mm256_sign_epi8(signed_codes[h], a));
            dot[h][r] = _mm256_add_epi32(dot[h][r], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      if constexpr (BITS == 4) {
        const auto* scale_zero = reinterpret_cast<const at::BFloat16*>(w + CODES) + h * 8;
        const __m256 s = widen8(scale_zero), l = _mm256_fnmadd_ps(_mm256_set1_ps(8), s, widen8(scale_zero + 16));
        for (int r = 0; r < R; ++r) {  // as the AVX512 block's, the group's 16-bit sums made 32-bit first
          const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[h][r], ones));
          acc[h][r] = _mm256_fmadd_ps(d, _mm256_mul_ps(s, _mm256_set1_ps(step[r * groups + g])), acc[h][r]);
          acc[h][r] = _mm256_fmadd_ps(l, _mm256_set1_ps(sum[r * groups + g]), acc[h][r]);
        }
      } else {
        for (int r = 0; r < R; ++r)
          acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h][r]), _mm256_set1_ps(step[r * groups + g]), acc[h][r]);
      }
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < R; ++r) {  // 8-bit: the codes were signed, so no offset to take back; the rows' scales
      if constexpr (BITS == 8) acc[h][r] = _mm256_mul_ps(widen8(scales + h * 8), acc[h][r]);
      _mm256_storeu_ps(out + r * out_stride + h * 8, acc[h][r]);
    }
}

// as quantize, above, bit for bit
AVX2 void quantize_avx2(const float* x, int64_t groups, int8_t* q, float* step, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packing's 4-byte pieces back in their order
  for (int64_t i = 0; i < groups; ++i) {
    __m256 a[4];
    __m256 most = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_loadu_ps(x + i * GROUP + 8 * j);
      most = _mm256_max_ps(most, _mm256_andnot_ps(sign, a[j]));
    }
    const float s = largest(most) / 127;
    const __m256 by = _mm256_set1_ps(s > 0 ? s : 1);
    __m256i c[4];
    for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_div_ps(a[j], by));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i*)(q + i * GROUP), _mm256_permutevar8x32_epi32(bytes, order));
    __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    step[i] = s;
    sum[i] = s * _mm_cvtsi128_si32(t);
  }
}

using Block = void (*)(const uint8_t*, const int8_t*, const float*, const float*, const at::BFloat16*, int64_t,
                       float*, int64_t);
template <int BITS>
constexpr Block BLOCKS[ROWS] = {block<BITS, 1>, block<BITS, 2>, block<BITS, 3>, block<BITS, 4>,
                                block<BITS, 5>, block<BITS, 6>, block<BITS, 7>, block<BITS, 8>};
template <int BITS>
constexpr Block BLOCKS_AVX2[ROWS_AVX2] = {block_avx2<BITS, 1>, block_avx2<BITS, 2>, block_avx2<BITS, 3>,
                                          block_avx2<BITS, 4>};

// x (rows x in, fp32), weights (out/16 x in/32 x the bytes of a group, 4- or 8-bit), 8-bit: scales (out, bf16)
// -> rows x out, with AVX512-VNNI's instructions if vnni, else AVX2's
at::Tensor int_linear(const at::Tensor& x, const at::Tensor& weights, const std::optional<at::Tensor>& scales,
                      bool vnni) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous rows x in, fp32");
  const int64_t rows = x.size(0), in = x.size(1), blocks = weights.size(0), groups = in / GROUP;
  const int64_t bytes = weights.size(2);
  const bool four = bytes == group_bytes<4>();
  TORCH_CHECK(in % GROUP == 0 && weights.size(1) == groups && weights.scalar_type() == at::kByte &&
                  weights.is_contiguous() && (four || bytes == group_bytes<8>()),
              "weights: out/16 x in/32 x ", group_bytes<4>(), " (4-bit) or ", group_bytes<8>(), " (8-bit) bytes");
  TORCH_CHECK(four != scales.has_value(), "8-bit weights need their rows' scales, 4-bit ones have theirs inside");
  const at::BFloat16* row_scales = nullptr;
  if (scales) {
    TORCH_CHECK(scales->scalar_type() == at::kBFloat16 && scales->is_contiguous() && scales->numel() == blocks * 16,
                "scales: one bf16 per output row (out)");
    row_scales = scales->data_ptr<at::BFloat16>();
  }
  // the quantized activations, then their steps and sums, in a buffer this thread keeps: three tensors allocated at
  // each call cost a decoding step 0.1-0.3 ms (SmolLM2's 120 int4 products for one row: 1.93-2.00 ms, not 2.12-2.34)
  thread_local std::vector<float> scratch;
  scratch.resize(rows * in / 4 + 2 * rows * groups);
  int8_t* qs = reinterpret_cast<int8_t*>(scratch.data());
  float* steps = scratch.data() + rows * in / 4;
  float* sums = steps + rows * groups;
  (vnni ? quantize : quantize_avx2)(x.data_ptr<float>(), rows * groups, qs, steps, sums);
  std::vector<float> totals(vnni && !four ? rows : 0);  // VNNI's 8-bit: each row's sums over all its groups
  for (int64_t r = 0; r < (int64_t)totals.size(); ++r)
    for (int64_t g = 0; g < groups; ++g) totals[r] += sums[r * groups + g];
  auto y = at::empty({rows, blocks * 16}, x.options());
  const uint8_t* ws = weights.data_ptr<uint8_t>();
  float* ys = y.data_ptr<float>();
  const Block* kinds = vnni ? (four ? BLOCKS<4> : BLOCKS<8>) : (four ? BLOCKS_AVX2<4> : BLOCKS_AVX2<8>);
  const int64_t chunk = vnni ? ROWS : ROWS_AVX2;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = 0; r < rows; r += chunk) {
        const int64_t n = std::min<int64_t>(chunk, rows - r);
        const float* sum = four ? sums + r * groups : vnni ? totals.data() + r : nullptr;  // (AVX2's 8-bit: none)
        kinds[n - 1](ws + b * groups * bytes, qs + r * in, steps + r * groups, sum,
                     row_scales ? row_scales + b * 16 : nullptr, in, ys + r * blocks * 16 + b * 16, blocks * 16);
      }
  });
  return y;
}

// Weights quantized as fournil.generate.quantize does it, bit for bit, and laid out for int_linear, in one pass over
// them: 4-bit, each group of 32 in 16 steps from its smallest to its largest, scale and zero rounded to bf16 first;
// 8-bit, each row in 127 steps of its largest |w| (bf16), the codes offset by 128. PyTorch's operations made the codes
// and then the layout in ten passes: SmolLM2's decoder layers took 0.29 s there on a 2-core AVX2 CPU, here 0.08 (with
// AVX2's instructions, on every CPU the kernel runs on). The inputs added to make whole groups are zeros, as are the
// rows added to make blocks of 16 (8-bit ones: codes 0, scale 0).
inline float to_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

AVX2 inline __m256 load8(const float* row, int64_t k, int64_t in) {  // 8 inputs from 8k, zeros past in
  const int64_t left = in - k * 8;
  if (left >= 8) return _mm256_loadu_ps(row + k * 8);
  if (left <= 0) return _mm256_setzero_ps();
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(row + k * 8, mask);
}

AVX2 inline __m256i rounded(__m256 v, float lowest, float highest) {  // to the nearest (ties to even), clamped
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(lowest)), _mm256_set1_ps(highest)));
}

AVX2 float row_scale(const float* row, int64_t in) {  // 8-bit: its largest |w| / 127, rounded to bf16
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 most = _mm256_setzero_ps();
  for (int64_t k = 0; k < (in + 7) / 8; ++k) most = _mm256_max_ps(most, _mm256_andnot_ps(sign, load8(row, k, in)));
  return to_bf16(std::max(largest(most), 1e-8f) / 127);
}

// one block of 16 rows (pointers to them; null past w's rows) into its groups of group_bytes<BITS>() bytes
template <int BITS>
AVX2 void pack_block(const float* const* rows, int64_t in, const float* row_scales, uint8_t* out) {
  constexpr float LOW = BITS == 4 ? 0 : -127, HIGH = BITS == 4 ? 15 : 127;  // the codes, before int8's offset
  const __m256i offset = _mm256_set1_epi32(BITS == 4 ? 0 : 128);
  const __m256 eight = _mm256_set1_ps(BITS == 4 ? 8 : 0);
  for (int64_t g = 0; g < (in + GROUP - 1) / GROUP; ++g) {
    uint8_t* group = out + g * group_bytes<BITS>();
    at::BFloat16* scale_zero = reinterpret_cast<at::BFloat16*>(group + 16 * GROUP * BITS / 8);
    for (int lane = 0; lane < 16; ++lane) {
      alignas(32) int32_t code[GROUP] = {};  // 8-bit rows past w's: codes 0
      const float* row = rows[lane];
      if (row || BITS == 4) {  // (4-bit rows past w's are zeros, quantized as w's)
        __m256 a[4];
        for (int j = 0; j < 4; ++j) a[j] = row ? load8(row, 4 * g + j, in) : _mm256_setzero_ps();
        float scale = row_scales ? row_scales[lane] : 0, zero = 0;
        if constexpr (BITS == 4) {
          const float low = smallest(_mm256_min_ps(_mm256_min_ps(a[0], a[1]), _mm256_min_ps(a[2], a[3])));
          const float high = largest(_mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3])));
          scale = to_bf16(std::max((high - low) / 15, 1e-6f)), zero = to_bf16(low + 8 * scale);
          scale_zero[lane] = scale;
          scale_zero[16 + lane] = zero;
        }
        // (w - zero) / scale + 8, in that order, as PyTorch computes it
        const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
        for (int j = 0; j < 4; ++j) {
          const __m256 c = _mm256_add_ps(_mm256_div_ps(_mm256_sub_ps(a[j], z), s), eight);
          _mm256_store_si256((__m256i*)(code + 8 * j), _mm256_add_epi32(rounded(c, LOW, HIGH), offset));
        }
      }
      // word k of the lane: its codes of inputs 4k..4k+3 (4-bit: of 8k..8k+3 in low nibbles, 8k+4..8k+7 in high)
      for (int k = 0; k < GROUP * BITS / 32; ++k) {
        uint8_t* word = group + (k * 16 + lane) * 4;
        for (int j = 0; j < 4; ++j) word[j] = BITS == 4 ? code[8 * k + j] | code[8 * k + 4 + j] << 4 : code[4 * k + j];
      }
    }
  }
}

// parts (each out_i x in, fp32), w their rows one after the other -> [w's packed weights (out/16 x in/32 x group
// bytes, both rounded up)] and, 8-bit, [w's rows' scales (bf16)]. (In parts, as fused layers are: joined, SmolLM2's
// q, k, v and gate, up were copied once more, 0.08 s of its load.)
std::vector<at::Tensor> int_quantize(at::TensorList parts, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
  TORCH_CHECK(!parts.empty(), "parts: at least one");
  const int64_t in = parts[0].size(1);
  std::vector<const float*> row_of;  // w's rows
  for (const auto& part : parts) {
    TORCH_CHECK(part.dim() == 2 && part.scalar_type() == at::kFloat && part.is_contiguous() && part.size(1) == in,
                "parts: contiguous out_i x in, fp32, all with the same inputs");
    for (int64_t r = 0; r < part.size(0); ++r) row_of.push_back(part.data_ptr<float>() + r * in);
  }
  const int64_t out = row_of.size(), blocks = (out + 15) / 16, groups = (in + GROUP - 1) / GROUP;
  std::vector<float> scales(bits == 8 ? blocks * 16 : 0);  // 8-bit: each row's largest |w| / 127, in bf16; 0 added
  at::parallel_for(0, (int64_t)scales.size(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < std::min(end, out); ++r) scales[r] = row_scale(row_of[r], in);
  });
  const int64_t bytes = bits == 4 ? group_bytes<4>() : group_bytes<8>();
  auto packed = at::empty({blocks, groups, bytes}, parts[0].options().dtype(at::kByte));
  uint8_t* ps = packed.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* rows[16];
      for (int lane = 0; lane < 16; ++lane) rows[lane] = b * 16 + lane < out ? row_of[b * 16 + lane] : nullptr;
      if (bits == 4)
        pack_block<4>(rows, in, nullptr, ps + b * groups * bytes);
      else
        pack_block<8>(rows, in, scales.data() + b * 16, ps + b * groups * bytes);
    }
  });
  if (bits == 4) return {packed};
  auto row_scales = at::empty({blocks * 16}, parts[0].options().dtype(at::kBFloat16));
  for (int64_t r = 0; r < blocks * 16; ++r) row_scales.data_ptr<at::BFloat16>()[r] = scales[r];
  return {packed, row_scales};
}

// 2 where the CPU has AVX512-VNNI (and the AVX512 that attention.cpp uses), 1 where it has AVX2 and FMA, else 0
int64_t instructions() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni"))
    return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

}  // namespace

TORCH_LIBRARY(fournil, m) {
  m.def("int_linear(Tensor x, Tensor weights, Tensor? scales, bool vnni) -> Tensor");
  m.def("instructions() -> int", &instructions);
  m.def("int_quantize(Tensor[] parts, int bits) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fournil, CPU, m) {
  m.impl("int_linear", &int_linear);
  m.impl("int_quantize", &int_quantize);
}
