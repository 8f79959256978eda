// Small vector pieces both kernels use (products.cpp, attention.cpp): bf16 widened to fp32, and the largest or
// smallest of 8 lanes.
#pragma once
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#define AVX512_VECTORS __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX2_VECTORS __attribute__((target("avx2,fma")))

AVX512_VECTORS inline __m512 widen16(const c10::BFloat16* p) {  // 16 bf16 to fp32: the same bits, then 16 zero bits
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

AVX2_VECTORS inline __m256 widen8(const c10::BFloat16* p) {  // 8 bf16 to fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

AVX2_VECTORS inline float largest(__m256 v) {  // of v's 8 values
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

AVX2_VECTORS inline float smallest(__m256 v) {
  __m128 h = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_min_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_min_ss(h, _mm_movehdup_ps(h)));
}
