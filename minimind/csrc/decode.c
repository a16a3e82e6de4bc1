/* Decoding on x86-64 CPUs: what a decode step (one new token per row) spends its time on.
 *
 * decode_gemm: y = x @ w^T, a few rows of x (one per sequence) against a large weight.
 * x: (M, K) row-major, w: (N, K) row-major (nn.Linear's layout), y: (M, N) row-major, float32.
 *
 * At M = 16 (an RL rollout's batch) BLAS libraries reach a quarter to a half of this CPU's peak: their
 * kernels are tuned for large M. Here each output is a dot product over K, computed in a 4 x 3 tile
 * (4 rows of x, 3 rows of w): 12 AVX2 accumulators + 3 weight vectors + 1 x vector fill the 16 ymm
 * registers, so every weight vector loaded feeds 4 FMAs and every x vector 3. Threads split the rows of
 * w, each thread streaming its own contiguous slice of the weight once. The next tile's weights are
 * prefetched a row per pass of 4 rows of x (not all in the first pass): spread out, the requests keep
 * memory busy through the whole tile (~15% faster with weights streamed from memory). Each output is
 * summed in a fixed order whatever the thread count, so results are the same from run to run.
 *
 * decode_attention: RoPE, the KV-cache write and softmax(q k^T / sqrt(d)) v for one new token per row,
 * the case where torch's attention kernels (and the dozen small ops around them) are mostly overhead.
 * decode_rmsnorm: RMSNorm, one call instead of torch's chain of small ops.
 * decode_step: a dense model's whole decode step with the above (and SwiGLU), in one call and one
 * parallel region: what the modules compute, without ~100 Python calls per token.
 * sample_rows: the next token of each row from its logits (inverse CDF) and its log-probability.
 *
 * The pieces are written as OpenMP work-sharing loops without their own parallel region, so that the
 * exported functions can run them alone (decode_gemm, decode_attention) or in sequence (decode_step).
 *
 * Built on first use by minimind/native.py with the system C compiler (-O3 -mavx2 -mfma -fopenmp);
 * each function is checked against the torch code it replaces in tests/test_native.py.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>

static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

/* One output: the dot product of x and w over K (any K: 8 lanes at a time, then the tail). */
static float dot(const float *x, const float *w, long K) {
  __m256 acc = _mm256_setzero_ps();
  long k = 0;
  for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), acc);
  float s = hsum(acc);
  for (; k < K; k++) s += x[k] * w[k];
  return s;
}

/* The 4 x 3 tile: y[m0..m0+3][n0..n0+2]. K8 = K rounded down to a multiple of 8. Meanwhile npf (0-3)
 * weight rows from pf on are prefetched (see gemm). */
static void tile4x3(const float *x, const float *w, float *y, long N, long K, long K8, const float *pf, int npf,
                    int add) {
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K;
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
  for (long k = 0; k < K8; k += 8) {
    if (npf > 0) _mm_prefetch((const char *)(pf + k), _MM_HINT_T0);
    if (npf > 1) _mm_prefetch((const char *)(pf + K + k), _MM_HINT_T0);
    if (npf > 2) _mm_prefetch((const char *)(pf + 2 * K + k), _MM_HINT_T0);
    __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k), v2 = _mm256_loadu_ps(w2 + k);
    __m256 u = _mm256_loadu_ps(x0 + k);
    a00 = _mm256_fmadd_ps(u, v0, a00), a01 = _mm256_fmadd_ps(u, v1, a01), a02 = _mm256_fmadd_ps(u, v2, a02);
    u = _mm256_loadu_ps(x1 + k);
    a10 = _mm256_fmadd_ps(u, v0, a10), a11 = _mm256_fmadd_ps(u, v1, a11), a12 = _mm256_fmadd_ps(u, v2, a12);
    u = _mm256_loadu_ps(x2 + k);
    a20 = _mm256_fmadd_ps(u, v0, a20), a21 = _mm256_fmadd_ps(u, v1, a21), a22 = _mm256_fmadd_ps(u, v2, a22);
    u = _mm256_loadu_ps(x3 + k);
    a30 = _mm256_fmadd_ps(u, v0, a30), a31 = _mm256_fmadd_ps(u, v1, a31), a32 = _mm256_fmadd_ps(u, v2, a32);
  }
  float s[4][3] = {{hsum(a00), hsum(a01), hsum(a02)}, {hsum(a10), hsum(a11), hsum(a12)},
                   {hsum(a20), hsum(a21), hsum(a22)}, {hsum(a30), hsum(a31), hsum(a32)}};
  for (int i = 0; i < 4; i++)
    for (int j = 0; j < 3; j++) {
      float t = s[i][j];
      for (long k = K8; k < K; k++) t += x[i * K + k] * w[j * K + k];
      y[i * N + j] = add ? y[i * N + j] + t : t;
    }
}

/* y = x @ w^T (add: y += x @ w^T, the residual stream's "h + proj(x)" with the same rounding).
 * Orphaned work-sharing (`omp for ... nowait`): called inside a parallel region, the threads split the
 * weight rows and go on without waiting (the caller puts the barrier where a result is read). */
static void gemm(const float *x, const float *w, float *y, long M, long N, long K, int add) {
  long K8 = K / 8 * 8, tiles = N / 3, passes = M / 4, per = passes >= 3 ? 1 : passes == 2 ? 2 : 3;
#pragma omp for schedule(static) nowait
  for (long t = 0; t <= tiles; t++) {
    long n0 = t * 3, n1 = n0 + 3 <= N ? n0 + 3 : N;
    long m0 = 0;
    if (n1 - n0 == 3)
      for (; m0 + 4 <= M; m0 += 4) {
        long first = m0 / 4 * per; /* pass m0 / 4 prefetches rows first.. of the next tile */
        int npf = t + 1 < tiles && first < 3 ? (int)(first + per <= 3 ? per : 3 - first) : 0;
        tile4x3(x + m0 * K, w + n0 * K, y + m0 * N + n0, N, K, K8, npf ? w + (n0 + 3 + first) * K : w, npf, add);
      }
    for (long m = m0; m < M; m++) /* rows of x left over, and the last weight rows */
      for (long n = n0; n < n1; n++) {
        float d = dot(x + m * K, w + n * K, K);
        y[m * N + n] = add ? y[m * N + n] + d : d;
      }
  }
}

void decode_gemm(const float *x, const float *w, float *y, long M, long N, long K, int threads) {
#pragma omp parallel num_threads(threads)
  gemm(x, w, y, M, N, K, 0);
}

/* e^x for 8 floats, x <= 0 (softmax after subtracting the maximum): x = n ln2 + r with |r| <= ln2 / 2,
 * e^r by its Taylor series to r^6 (relative error < 2e-7), times 2^n built in the exponent bits.
 * Below -87 the result is 0 (e^-87 is under float32's smallest normal number). */
static inline __m256 exp_nonpositive(__m256 x) {
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x); /* ln2 in two parts, exact products */
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 e = _mm256_set1_ps(1.0f / 720);
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 120));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 24));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 6));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
  e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
  __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(small, _mm256_mul_ps(e, _mm256_castsi256_ps(two_n)));
}

/* p[l] = scale * (q . k_l) for L keys of D: eight keys at a time, so that eight independent FMA chains
 * hide each other's latency (one dot product alone waits on its own additions). */
static void scores(const float *q, const float *k, float *p, long L, long D, float scale) {
  long l = 0, D8 = D / 8 * 8;
  for (; l + 8 <= L; l += 8) {
    const float *kl = k + l * D;
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (long d = 0; d < D8; d += 8) {
      __m256 u = _mm256_loadu_ps(q + d);
      for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(u, _mm256_loadu_ps(kl + i * D + d), a[i]);
    }
    for (int i = 0; i < 8; i++) {
      float s = hsum(a[i]);
      for (long d = D8; d < D; d++) s += q[d] * kl[i * D + d];
      p[l + i] = s * scale;
    }
  }
  for (; l < L; l++) p[l] = dot(q, k + l * D, D) * scale;
}

/* p[l] = e^(p[l] - top) in place; -inf (a masked key) gives 0. */
static void exp_shifted(float *p, long L, float top) {
  long l = 0;
  for (; l + 8 <= L; l += 8)
    _mm256_storeu_ps(p + l, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + l), _mm256_set1_ps(top))));
  for (; l < L; l++) p[l] = expf(p[l] - top);
}

/* y = w * (x / sqrt(mean(x^2) + eps)) for each of M rows of D: RMSNorm (float32 statistics). y may be x.
 * Work-shared by rows inside a parallel region (with the loop's barrier); on one thread outside one. */
static void rmsnorm(const float *x, const float *w, float *y, long M, long D, float eps) {
#pragma omp for schedule(static)
  for (long m = 0; m < M; m++) {
    const float *xr = x + m * D;
    float r = 1.0f / sqrtf(dot(xr, xr, D) / D + eps);
    for (long d = 0; d < D; d++) y[m * D + d] = w[d] * (xr[d] * r);
  }
}

void decode_rmsnorm(const float *x, const float *w, float *y, long M, long D, float eps) { rmsnorm(x, w, y, M, D, eps); }

/* RoPE of one head row: y = x * cos + roll(x, D / 2) * signed_sin (signed_sin's first half negated). */
static void rope(const float *x, const float *c, const float *s, float *y, long D) {
  long h = D / 2;
  for (long d = 0; d < D; d++) y[d] = x[d] * c[d] + x[d < h ? d + h : d - h] * s[d];
}

/* The attention of one decode step, one new token per row:
 *   k_new, v_new (B, KVH, D) -> RoPE on k -> written at position L - 1 of the cache k, v (B, KVH, *, D:
 *   row stride D, the given batch / head strides), then for every query head q (B, H, D), after RoPE,
 *   softmax(q k^T / sqrt(D)) v over the L cached positions -> out (B, H, D).
 * cos, sin: (B, D), the new token's position in each row. keep: (B, L) bytes, 0 = padding (NULL: keep
 * all). scratch: (threads, L + D) floats. Query head h reads key/value head h / (H / KVH) (grouped-query
 * attention). A row that may see no key gets zeros (torch would give NaN; the model never asks for one). */
static void attention(const float *q, const float *k_new, const float *v_new, const float *cos, const float *sin,
                      float *k, float *v, const unsigned char *keep, float *out, long B, long H, long KVH, long L,
                      long D, long kv_batch_stride, long kv_head_stride, float scale, float *scratch) {
  long group = H / KVH;
  {
    float *p = scratch + omp_get_thread_num() * (L + D), *qr = p + L;
#pragma omp for schedule(static)
    for (long bk = 0; bk < B * KVH; bk++) {
      long b = bk / KVH, off = b * kv_batch_stride + (bk % KVH) * kv_head_stride + (L - 1) * D;
      rope(k_new + bk * D, cos + b * D, sin + b * D, k + off, D);
      for (long d = 0; d < D; d++) v[off + d] = v_new[bk * D + d];
    }
#pragma omp for schedule(static)
    for (long bh = 0; bh < B * H; bh++) {
      long b = bh / H, h = bh % H;
      rope(q + bh * D, cos + b * D, sin + b * D, qr, D);
      const float *kb = k + b * kv_batch_stride + (h / group) * kv_head_stride;
      const float *vb = v + b * kv_batch_stride + (h / group) * kv_head_stride;
      const unsigned char *kp = keep ? keep + b * L : NULL;
      float *o = out + bh * D, top = -INFINITY, total = 0.0f;
      scores(qr, kb, p, L, D, scale);
      for (long l = 0; l < L; l++) {
        if (kp && !kp[l]) p[l] = -INFINITY;
        if (p[l] > top) top = p[l];
      }
      for (long d = 0; d < D; d++) o[d] = 0.0f;
      if (top == -INFINITY) continue;
      exp_shifted(p, L, top);
      long D8 = D / 8 * 8;
      if (D == 64) { /* the usual head size: the output row stays in 8 registers across the keys */
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
        for (long l = 0; l < L; l++) {
          const float *vr = vb + l * D;
          const __m256 e = _mm256_set1_ps(p[l]);
          total += p[l];
          o0 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr), o0), o1 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 8), o1);
          o2 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 16), o2), o3 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 24), o3);
          o4 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 32), o4), o5 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 40), o5);
          o6 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 48), o6), o7 = _mm256_fmadd_ps(e, _mm256_loadu_ps(vr + 56), o7);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / total);
        __m256 rows[8] = {o0, o1, o2, o3, o4, o5, o6, o7};
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(rows[i], inv));
        continue;
      }
      for (long l = 0; l < L; l++) {
        const float e = p[l], *vr = vb + l * D;
        total += e;
        if (e == 0.0f) continue;
        const __m256 ev = _mm256_set1_ps(e);
        for (long d = 0; d < D8; d += 8)
          _mm256_storeu_ps(o + d, _mm256_fmadd_ps(ev, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(o + d)));
        for (long d = D8; d < D; d++) o[d] += e * vr[d];
      }
      for (long d = 0; d < D; d++) o[d] /= total;
    }
  }
}

void decode_attention(const float *q, const float *k_new, const float *v_new, const float *cos, const float *sin,
                      float *k, float *v, const unsigned char *keep, float *out, long B, long H, long KVH, long L,
                      long D, long kv_batch_stride, long kv_head_stride, float scale, float *scratch, int threads) {
#pragma omp parallel num_threads(threads)
  attention(q, k_new, v_new, cos, sin, k, v, keep, out, B, H, KVH, L, D, kv_batch_stride, kv_head_stride, scale,
            scratch);
}

/* g = silu(g) * u = g * sigmoid(g) * u for n floats (the SwiGLU gate), work-shared. sigmoid from
 * e = e^-|g| (never overflows): 1 / (1 + e) for g >= 0, e / (1 + e) below. */
static void silu_mul(float *g, const float *u, long n) {
  long n8 = n / 8;
#pragma omp for schedule(static)
  for (long i = 0; i < n8; i++) {
    __m256 x = _mm256_loadu_ps(g + 8 * i);
    __m256 e = exp_nonpositive(_mm256_or_ps(_mm256_set1_ps(-0.0f), x)); /* e^-|x| */
    __m256 s = _mm256_div_ps(_mm256_blendv_ps(_mm256_set1_ps(1.0f), e, x), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_storeu_ps(g + 8 * i, _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u + 8 * i)));
  }
#pragma omp single
  for (long i = n8 * 8; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* A whole decode step of a dense model, one new token per row, in one parallel region (what the model's
 * modules do with the kernels above, without a Python call per module):
 *   for each layer: h += o(attention(rope(q(n1)), rope(k(n1)), v(n1), cache)), n1 = rmsnorm(h)
 *                   h += down(silu(gate(n2)) * up(n2)),                          n2 = rmsnorm(h)
 *   hidden = rmsnorm(h); logits = hidden @ head^T
 * w: per layer, STEP_WEIGHTS pointers in the order of the enum (q_norm, k_norm NULL: no q/k norm).
 * h: (M, D) the new tokens' embeddings, overwritten (the residual stream). k, v: the cache, (layers, B,
 * KVH, *, Dh) with the given strides; position L - 1 is written. cos, sin: (M, Dh); keep as in
 * decode_attention. scratch: decode_step_scratch(...) floats. */
enum { ATTN_NORM, WQ, WK, WV, Q_NORM, K_NORM, WO, MLP_NORM, WGATE, WUP, WDOWN, STEP_WEIGHTS };

long decode_step_scratch(long M, long D, long H, long KVH, long Dh, long F, long L, int threads) {
  return M * D + 2 * M * H * Dh + 2 * M * KVH * Dh + 2 * M * F + threads * (L + Dh);
}

void decode_step(const float *const *w, long layers, const float *norm, const float *head, float *h, float *hidden,
                 float *logits, float *k, float *v, long layer_stride, long batch_stride, long head_stride,
                 const float *cos, const float *sin, const unsigned char *keep, long M, long D, long H, long KVH,
                 long Dh, long F, long V, long L, float eps, float *scratch, int threads) {
  float *n = scratch, *q = n + M * D, *kn = q + M * H * Dh, *vn = kn + M * KVH * Dh, *a = vn + M * KVH * Dh;
  float *g = a + M * H * Dh, *u = g + M * F, *att = u + M * F;
  float scale = (float)pow((double)Dh, -0.5); /* as torch's D ** -0.5 */
#pragma omp parallel num_threads(threads)
  {
    for (long l = 0; l < layers; l++) {
      const float *const *lw = w + l * STEP_WEIGHTS;
      rmsnorm(h, lw[ATTN_NORM], n, M, D, eps);
      gemm(n, lw[WQ], q, M, H * Dh, D, 0);
      gemm(n, lw[WK], kn, M, KVH * Dh, D, 0);
      gemm(n, lw[WV], vn, M, KVH * Dh, D, 0);
#pragma omp barrier
      if (lw[Q_NORM]) {
        rmsnorm(q, lw[Q_NORM], q, M * H, Dh, eps);
        rmsnorm(kn, lw[K_NORM], kn, M * KVH, Dh, eps);
      }
      attention(q, kn, vn, cos, sin, k + l * layer_stride, v + l * layer_stride, keep, a, M, H, KVH, L, Dh,
                batch_stride, head_stride, scale, att);
      gemm(a, lw[WO], h, M, D, H * Dh, 1);
#pragma omp barrier
      rmsnorm(h, lw[MLP_NORM], n, M, D, eps);
      gemm(n, lw[WGATE], g, M, F, D, 0);
      gemm(n, lw[WUP], u, M, F, D, 0);
#pragma omp barrier
      silu_mul(g, u, M * F);
      gemm(g, lw[WDOWN], h, M, D, F, 1);
#pragma omp barrier
    }
    rmsnorm(h, norm, hidden, M, D, eps);
    gemm(hidden, head, logits, M, V, D, 0);
  }
}

/* Sampling at the end of a decode step: for each of B rows of logits (V entries, -inf = excluded), the
 * token whose cumulative probability first exceeds u[b] * total (inverse CDF: one uniform per row) and
 * its log-probability (x - max) - log(sum e^(x - max)). Probabilities are e^(x - max) in float32 (the
 * vectorised exp above), summed in float64; the target stays strictly below the total, and a token of
 * probability 0 never moves the running sum, so it is never chosen. A row with a NaN logit gets token -1.
 * scratch: (threads, V) floats. */
void sample_rows(const float *logits, long B, long V, const double *u, long *tokens, float *logp, float *scratch,
                 int threads) {
#pragma omp parallel num_threads(threads)
  {
    float *e = scratch + omp_get_thread_num() * V;
#pragma omp for schedule(static)
    for (long b = 0; b < B; b++) {
      const float *x = logits + b * V;
      float top = -INFINITY;
      int nan = 0;
      for (long i = 0; i < V; i++) top = x[i] > top ? x[i] : top, nan |= x[i] != x[i];
      if (nan) { /* nothing to sample from: the caller raises */
        tokens[b] = -1, logp[b] = NAN;
        continue;
      }
      for (long i = 0; i < V; i++) e[i] = x[i];
      exp_shifted(e, V, top);
      double total = 0.0;
      for (long i = 0; i < V; i++) total += e[i];
      double target = u[b] * total, run = 0.0;
      if (target >= total) target = nextafter(total, 0.0);
      long pick = -1, last = 0;
      for (long i = 0; i < V; i++) {
        if (e[i] > 0.0f) last = i;
        run += e[i];
        if (run > target) {
          pick = i;
          break;
        }
      }
      if (pick < 0) pick = last; /* rounding left the target at the very end */
      tokens[b] = pick;
      logp[b] = (float)((double)(x[pick] - top) - log(total));
    }
  }
}
