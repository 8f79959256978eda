// A decoding step's attention for one set of vector instructions: attention.cpp includes this file once per set, in
// a namespace that defines the set's vectors (V, of W fp32 lanes), their operations and TARGET, so that the
// algorithm is written once.

// e^x (x <= 0: a score minus the largest), as 2^n 2^f with |f| <= 1/2 and 2^f by its Taylor polynomial of degree 6
// (relative error below 1e-7); -inf (a masked key) gives exactly 0
TARGET inline V exps(V x) {
  const V t = mul(max(x, set1(-87.0f)), set1(1.44269504088896341f));
  const V n = round(t);
  const V f = sub(t, n);
  V p = set1(1.535336188319500e-4f);
  for (float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                  6.931472028550421e-1f, 1.0f})
    p = fmadd(p, f, set1(c));
  return zero_where_minus_inf(x, times_pow2(p, n));
}

// scores[g][s] = q[g] . k[s] / sqrt(D), or -inf where the mask says no; W keys at a time, up to 8 query heads at a
// time (each key read once for them). A row of scores is S rounded up to W long, -inf past S. C: head_dim / W, so
// that a key stays in registers.
template <int C, typename T>
TARGET void scores_of(const float* q, const T* k, int64_t key_stride, const bool* mask, int64_t S, int64_t G,
                      float* scores) {
  constexpr int D = W * C;
  const int64_t stride = padded(S, W);
  const V scale = set1(1.0f / std::sqrt(static_cast<float>(D)));
  constexpr uint32_t EVERY_KEY = (1u << W) - 1;
  alignas(64) float part[8 * W * W];  // per head and key, the W partial sums of its dot product
  for (int64_t s = 0; s < S; s += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, S - s));
    uint32_t kept = (1u << n) - 1;  // bit j: key s + j is attended to
    for (int j = 0; mask && j < n; ++j)
      if (!mask[s + j]) kept &= ~(1u << j);
    for (int j = 0; j < W && s + AHEAD + j < S; ++j) prefetch_row<D>(k + (s + AHEAD + j) * key_stride);
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int heads = static_cast<int>(std::min<int64_t>(8, G - g0));
      for (int j = 0; j < W; ++j) {
        V key[C];
        for (int c = 0; c < C; ++c) key[c] = j < n ? load(k + (s + j) * key_stride + W * c) : zero();
        for (int g = 0; g < heads; ++g) {
          const float* qg = q + (g0 + g) * D;
          V acc = mul(load(qg), key[0]);
          for (int c = 1; c < C; ++c) acc = fmadd(load(qg + W * c), key[c], acc);
          store(part + (g * W + j) * W, acc);
        }
      }
      for (int g = 0; g < heads; ++g) {
        V a[W];
        for (int j = 0; j < W; ++j) a[j] = load(part + (g * W + j) * W);
        float* row = scores + (g0 + g) * stride + s;
        store(row, mul(sums(a), scale));
        for (int j = 0; kept != EVERY_KEY && j < W; ++j)
          if (!(kept >> j & 1)) row[j] = MINUS_INF;
      }
    }
  }
}

// a row of scores (a multiple of W long) to e^(score - the largest) in place; returns 1 / their sum (0 if every key
// is masked)
TARGET float softmax_row(float* row, int64_t S) {
  V most = set1(MINUS_INF);
  for (int64_t s = 0; s < S; s += W) most = max(most, load(row + s));
  const float m = reduce_max(most);
  if (m == MINUS_INF) {
    std::fill(row, row + S, 0.0f);
    return 0.0f;
  }
  V total = zero();
  for (int64_t s = 0; s < S; s += W) {
    const V e = exps(sub(load(row + s), set1(m)));
    store(row + s, e);
    total = add(total, e);
  }
  return 1.0f / reduce_add(total);
}

// out[g] = sum over s of weights[g][s] v[s], times inv[g], for C vectors of a head's columns (those of v and out): P
// query heads at once, each value read and widened once for them, their sums in registers
template <int C, int P, typename T>
TARGET void values_of(const float* weights, int64_t stride, const T* v, int64_t value_stride, int64_t S,
                      const float* inv, float* out, int64_t D) {
  V acc[P][C];
  for (int g = 0; g < P; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = zero();
  for (int64_t s = 0; s < S; ++s) {
    if (s + AHEAD < S) prefetch_row<W * C>(v + (s + AHEAD) * value_stride);
    V value[C];
    for (int c = 0; c < C; ++c) value[c] = load(v + s * value_stride + W * c);
    for (int g = 0; g < P; ++g) {
      const V w = set1(weights[g * stride + s]);
      for (int c = 0; c < C; ++c) acc[g][c] = fmadd(w, value[c], acc[g][c]);
    }
  }
  for (int g = 0; g < P; ++g)
    for (int c = 0; c < C; ++c) store(out + g * D + W * c, mul(acc[g][c], set1(inv[g])));
}

// values_of for P query heads, over a head's C vectors of columns, as many at a time as leave their sums in registers
template <int C, int P, typename T>
TARGET void weighted_values(const float* weights, int64_t stride, const T* v, int64_t value_stride, int64_t S,
                            const float* inv, float* out) {
  constexpr int columns = [] {  // the most that divide C, with P * columns at most SUMS
    int n = std::max(1, std::min(C, SUMS / P));
    while (C % n) --n;
    return n;
  }();
  for (int c = 0; c < C; c += columns)
    values_of<columns, P>(weights, stride, v + W * c, value_stride, S, inv, out + W * c, W * C);
}

// the G query heads that share one key/value head, for one row
template <int C, typename T>
TARGET void heads(const float* q, const T* k, const T* v, int64_t key_stride, int64_t value_stride, const bool* mask,
                  int64_t S, int64_t G, float* scores, float* inv, float* out) {
  constexpr int D = W * C;
  const int64_t stride = padded(S, W);
  scores_of<C>(q, k, key_stride, mask, S, G, scores);
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_row(scores + g * stride, stride);
  for (int64_t g = 0; g < G; g += 4) {  // up to 4 query heads at a time
    const float *w = scores + g * stride, *i = inv + g;
    switch (std::min<int64_t>(4, G - g)) {
      case 4: weighted_values<C, 4>(w, stride, v, value_stride, S, i, out + g * D); break;
      case 3: weighted_values<C, 3>(w, stride, v, value_stride, S, i, out + g * D); break;
      case 2: weighted_values<C, 2>(w, stride, v, value_stride, S, i, out + g * D); break;
      default: weighted_values<C, 1>(w, stride, v, value_stride, S, i, out + g * D);
    }
  }
}

// by head size, 16 to 128
template <typename T>
constexpr Heads<T> HEADS[8] = {heads<16 / W, T>, heads<32 / W, T>, heads<48 / W, T>, heads<64 / W, T>,
                               heads<80 / W, T>, heads<96 / W, T>, heads<112 / W, T>, heads<128 / W, T>};
