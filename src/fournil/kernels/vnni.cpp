// Quantized weights (4- or 8-bit codes) times int8 activations, in integers, on CPUs with AVX512-VNNI (as llama.cpp
// multiplies its Q4_1 and Q8_0 blocks by Q8 activations).
//
// PyTorch's int4 and int8 CPU kernels convert the weights and multiply in fp32 or bf16: with a few rows (a batch
// decoding) that arithmetic, not reading the weights, sets their speed. Here each row's activations are quantized to
// int8 in groups of 32 inputs (one scale each, the weights' groups), and one VNNI instruction multiplies 64 weight
// codes by 64 activations and adds them into 16 int32 sums: four times the products of an fp32 instruction, exact.
//
// Layout (made by vnni_quantize, below): the output rows in blocks of 16, one zmm lane each, and a block's
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

namespace {

constexpr int GROUP = 32;
constexpr int ROWS = 8;  // activation rows per pass over a block of weights: 16 zmm accumulators of 32

template <int BITS>
constexpr int group_bytes() {  // a group of a block: 16 x 32 codes, then (4-bit) 16 scales and 16 zeros
  return 16 * GROUP * BITS / 8 + (BITS == 4 ? 2 * 16 * 2 : 0);
}

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

VNNI inline __m512 widen(const at::BFloat16* p) {  // 16 bf16 to fp32: the same bits, then 16 zero bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

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
      const __m512 s = widen(scale_zero), l = _mm512_fnmadd_ps(offset, s, widen(scale_zero + 16));
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
      acc[r] = _mm512_mul_ps(widen(scales), _mm512_fnmadd_ps(offset, _mm512_set1_ps(sum[r]), acc[r]));
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

using Block = void (*)(const uint8_t*, const int8_t*, const float*, const float*, const at::BFloat16*, int64_t,
                       float*, int64_t);
template <int BITS>
constexpr Block BLOCKS[ROWS] = {block<BITS, 1>, block<BITS, 2>, block<BITS, 3>, block<BITS, 4>,
                                block<BITS, 5>, block<BITS, 6>, block<BITS, 7>, block<BITS, 8>};

// x (rows x in, fp32), weights (out/16 x in/32 x the bytes of a group, 4- or 8-bit), 8-bit: scales (out, bf16)
// -> rows x out
at::Tensor vnni_linear(const at::Tensor& x, const at::Tensor& weights, const std::optional<at::Tensor>& scales) {
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
  quantize(x.data_ptr<float>(), rows * groups, qs, steps, sums);
  std::vector<float> totals(four ? 0 : rows);  // 8-bit: each row's sums over all its groups
  for (int64_t r = 0; r < (int64_t)totals.size(); ++r)
    for (int64_t g = 0; g < groups; ++g) totals[r] += sums[r * groups + g];
  auto y = at::empty({rows, blocks * 16}, x.options());
  const uint8_t* ws = weights.data_ptr<uint8_t>();
  float* ys = y.data_ptr<float>();
  const Block* kinds = four ? BLOCKS<4> : BLOCKS<8>;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = 0; r < rows; r += ROWS) {
        const int64_t n = std::min<int64_t>(ROWS, rows - r);
        const float* sum = four ? sums + r * groups : totals.data() + r;
        kinds[n - 1](ws + b * groups * bytes, qs + r * in, steps + r * groups, sum,
                     row_scales ? row_scales + b * 16 : nullptr, in, ys + r * blocks * 16 + b * 16, blocks * 16);
      }
  });
  return y;
}

// Weights quantized as fournil.generate.quantize does it, bit for bit, and laid out for vnni_linear, in one pass over
// them: 4-bit, each group of 32 in 16 steps from its smallest to its largest, scale and zero rounded to bf16 first;
// 8-bit, each row in 127 steps of its largest |w| (bf16), the codes offset by 128. PyTorch's operations made the codes
// and then the layout in ten passes: SmolLM2's load spent 0.31 s there, now 0.11. The inputs added to make whole
// groups are zeros, as are the rows added to make blocks of 16 (8-bit ones: codes 0, scale 0).
VNNI inline float to_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

VNNI inline __m512 load(const float* row, int64_t g, int64_t in) {  // a group's 16 inputs from 16g, zeros past in
  const int64_t left = in - g * 16;
  return left >= 16 ? _mm512_loadu_ps(row + g * 16)
                    : _mm512_maskz_loadu_ps(left > 0 ? (__mmask16)((1u << left) - 1) : 0, row + g * 16);
}

VNNI inline __m512i rounded(__m512 v, float lowest, float highest) {  // to the nearest (ties to even), clamped
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(lowest)), _mm512_set1_ps(highest)));
}

VNNI float row_scale(const float* row, int64_t in) {  // 8-bit: its largest |w| / 127, rounded to bf16
  __m512 most = _mm512_setzero_ps();
  for (int64_t g = 0; g < (in + 15) / 16; ++g) most = _mm512_max_ps(most, _mm512_abs_ps(load(row, g, in)));
  return to_bf16(std::max(_mm512_reduce_max_ps(most), 1e-8f) / 127);
}

// one block of 16 rows (pointers to them; null past w's rows) into its groups of group_bytes<BITS>() bytes
template <int BITS>
VNNI void pack_block(const float* const* rows, int64_t in, const float* row_scales, uint8_t* out) {
  constexpr float LOW = BITS == 4 ? 0 : -127, HIGH = BITS == 4 ? 15 : 127;  // the codes, before int8's offset
  const __m512i offset = _mm512_set1_epi32(BITS == 4 ? 0 : 128);
  const __m512 eight = _mm512_set1_ps(BITS == 4 ? 8 : 0);
  for (int64_t g = 0; g < (in + GROUP - 1) / GROUP; ++g) {
    uint8_t* group = out + g * group_bytes<BITS>();
    at::BFloat16* scale_zero = reinterpret_cast<at::BFloat16*>(group + 16 * GROUP * BITS / 8);
    for (int lane = 0; lane < 16; ++lane) {
      alignas(64) int32_t code[GROUP] = {};  // 8-bit rows past w's: codes 0
      const float* row = rows[lane];
      if (row || BITS == 4) {  // (4-bit rows past w's are zeros, quantized as w's)
        const __m512 a = row ? load(row, 2 * g, in) : _mm512_setzero_ps();
        const __m512 b = row ? load(row, 2 * g + 1, in) : _mm512_setzero_ps();
        float scale = row_scales ? row_scales[lane] : 0, zero = 0;
        if constexpr (BITS == 4) {
          const float low = _mm512_reduce_min_ps(_mm512_min_ps(a, b));
          const float high = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
          scale = to_bf16(std::max((high - low) / 15, 1e-6f)), zero = to_bf16(low + 8 * scale);
          scale_zero[lane] = scale;
          scale_zero[16 + lane] = zero;
        }
        // (w - zero) / scale + 8, in that order, as PyTorch computes it
        const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
        const __m512 ca = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(a, z), s), eight);
        const __m512 cb = _mm512_add_ps(_mm512_div_ps(_mm512_sub_ps(b, z), s), eight);
        _mm512_store_si512(code, _mm512_add_epi32(rounded(ca, LOW, HIGH), offset));
        _mm512_store_si512(code + 16, _mm512_add_epi32(rounded(cb, LOW, HIGH), offset));
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
std::vector<at::Tensor> vnni_quantize(at::TensorList parts, int64_t bits) {
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

bool vnni_available() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

}  // namespace

TORCH_LIBRARY(fournil, m) {
  m.def("vnni_linear(Tensor x, Tensor weights, Tensor? scales) -> Tensor");
  m.def("vnni_available() -> bool", &vnni_available);
  m.def("vnni_quantize(Tensor[] parts, int bits) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fournil, CPU, m) {
  m.impl("vnni_linear", &vnni_linear);
  m.impl("vnni_quantize", &vnni_quantize);
}
