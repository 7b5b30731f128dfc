// elastiq's CPU ops, built once per machine by kernels/cpu_ops.py and registered as torch.ops.elastiq.*:
//
// q4_matmul: a GGUF Q4_0 matrix by bfloat16 activations. The weight is the checkpoint's own blocks,
// row-major: codes [N, K/32, 16] (byte j of a block holds codes j and j + 16) and fp16 scales
// [N, K/32], w = (code - 8 + zero) * d. A row's stride may exceed K/32 blocks, so a matrix held at a
// wider rate multiplies as its first K/32 blocks. Each activation row is quantized per block of 32 to
// int16 codes and a float scale (an error far below bfloat16's rounding; llama.cpp's 8-bit codes cost
// a measurable KL), each block's dot product is summed exactly in int32 (AVX2: madd of int16 weights
// by int16 activations), then scaled and accumulated in float32; the output is rounded to bfloat16
// once. Without AVX2 a portable loop computes the same sums. Output rows are split among ATen's threads.
//
// rms_norm and rope_gather_: the decode step's small per-block ops, one call each instead of the
// dozen torch ops (and their dispatch, a few microseconds each) that the torch paths take.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ELASTIQ_X86 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kPacked = 16;
constexpr float kMaxCode = 32767.f;  // activations: int16 codes a block, well below bf16's rounding

struct Weights { const uint8_t* codes; const c10::Half* scales; int64_t cstride, sstride; int off; };
struct Acts { const int16_t* q; const float* d; int64_t K, blocks; bool portable; };

void quantize_rows(const c10::BFloat16* x, int64_t M, int64_t K, int16_t* q, float* d) {
  const int64_t blocks = K / kBlock;
  at::parallel_for(0, M * blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const c10::BFloat16* v = x + i * kBlock;  // rows are contiguous, so block i of the whole
      float f[kBlock], amax = 0.f;
      for (int j = 0; j < kBlock; ++j) { f[j] = static_cast<float>(v[j]); amax = std::max(amax, std::fabs(f[j])); }
      const float scale = amax / kMaxCode, inv = scale != 0.f ? 1.f / scale : 0.f;
      for (int j = 0; j < kBlock; ++j) q[i * kBlock + j] = static_cast<int16_t>(std::nearbyint(f[j] * inv));
      d[i] = scale;
    }
  });
}

// Rows n..n+R of the weight by activation rows m..m+C:
// out[r][c] = sum_b dw[r,b] * dx[c,b] * sum_j (code[r,b,j] - off) * xq[c,b,j]
template <int R, int C>
void tile_generic(const Weights& w, const Acts& a, int64_t n, int64_t m, float out[R][C]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const uint8_t* codes = w.codes + (n + r) * w.cstride;
      const c10::Half* ws = w.scales + (n + r) * w.sstride;
      const int16_t* q = a.q + (m + c) * a.K;
      const float* d = a.d + (m + c) * a.blocks;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        int s = 0;
        for (int j = 0; j < kPacked; ++j) {
          const int byte = codes[b * kPacked + j];
          s += ((byte & 0x0F) - w.off) * q[b * kBlock + j] + ((byte >> 4) - w.off) * q[b * kBlock + j + kPacked];
        }
        acc += static_cast<float>(ws[b]) * d[b] * s;
      }
      out[r][c] = acc;
    }
}

#ifdef ELASTIQ_X86
__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

template <int R, int C>
__attribute__((target("avx2,fma,f16c")))
void tile_avx2(const Weights& w, const Acts& a, int64_t n, int64_t m, float out[R][C]) {
  const __m128i low = _mm_set1_epi8(0x0F), off = _mm_set1_epi8(static_cast<char>(w.off));
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    __m256i x0[C], x1[C]; __m256 dx[C];
    _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) {
      const int16_t* xq = a.q + (m + c) * a.K + b * kBlock;
      x0[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      x1[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + kPacked));
      dx[c] = _mm256_set1_ps(a.d[(m + c) * a.blocks + b]);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const uint8_t* row = w.codes + (n + r) * w.cstride + b * kPacked;
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(raw, low), off));  // codes 0..15
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low), off));
      const __m256 dw = _mm256_set1_ps(_cvtsh_ss(w.scales[(n + r) * w.sstride + b].x));
      _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) {
        const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(w0, x0[c]), _mm256_madd_epi16(w1, x1[c]));
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, dx[c]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) out[r][c] = hsum(acc[r][c]);
}

#endif

bool has_avx2(bool portable) {
  if (portable) return false;
#ifdef ELASTIQ_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  return yes;
#else
  return false;
#endif
}

template <int R, int C>
void tile(const Weights& w, const Acts& a, int64_t n, int64_t m, int64_t N, c10::BFloat16* out) {
  float v[R][C];
#ifdef ELASTIQ_X86
  if (has_avx2(a.portable)) tile_avx2<R, C>(w, a, n, m, v); else
#endif
  tile_generic<R, C>(w, a, n, m, v);
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) out[(m + c) * N + n + r] = c10::BFloat16(v[r][c]);
}

// Rows n..n+R of the weight times activation rows m..m+cols (cols <= C), for any cols.
template <int R, int C>
void tiles(const Weights& w, const Acts& a, int64_t n, int64_t M, int64_t N, c10::BFloat16* out) {
  int64_t m = 0;
  for (; m + C <= M; m += C) tile<R, C>(w, a, n, m, N, out);
  for (; m < M; ++m) tile<R, 1>(w, a, n, m, N, out);
}

// x [M, K] bf16 (contiguous) times the Q4_0 matrix of codes [N, >=K/32, 16] uint8 and scales
// [N, >=K/32] fp16 (rows may be strided: a held matrix's first K/32 blocks), w = (code - 8 + zero) * d.
// ``portable`` takes the portable loop even where AVX2 runs (its tests).
at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, int64_t zero,
                     bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) % kBlock == 0,
              "q4_matmul: x must be contiguous bfloat16 [M, K], K a multiple of 32; got ", x.sizes());
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kPacked && codes.scalar_type() == at::kByte &&
              codes.stride(2) == 1 && codes.stride(1) == kPacked && codes.size(1) >= x.size(1) / kBlock,
              "q4_matmul: codes must be uint8 [N, >=K/32, 16] with contiguous rows; got ", codes.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == codes.size(0) && scales.size(1) >= x.size(1) / kBlock &&
              scales.scalar_type() == at::kHalf && scales.stride(1) == 1,
              "q4_matmul: scales must be float16 [N, >=K/32]; got ", scales.sizes());
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && scales.device().is_cpu(),
              "q4_matmul runs on CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), blocks = K / kBlock;
  std::vector<int16_t> q(M * K);
  std::vector<float> d(M * blocks);
  quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, q.data(), d.data());
  const Weights w{codes.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), codes.stride(0), scales.stride(0),
                  static_cast<int>(8 - zero)};
  const Acts a{q.data(), d.data(), K, blocks, portable};
  at::Tensor out = at::empty({M, N}, x.options());
  auto* o = out.data_ptr<c10::BFloat16>();
  constexpr int kRows = 4;
  const int64_t tiles_n = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, blocks * M * kRows));
  at::parallel_for(0, tiles_n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * kRows;
      if (n + kRows <= N) {
        if (M == 1) tile<4, 1>(w, a, n, 0, N, o); else tiles<2, 4>(w, a, n, M, N, o), tiles<2, 4>(w, a, n + 2, M, N, o);
      } else {
        for (int64_t r = n; r < N; ++r) tiles<1, 4>(w, a, r, M, N, o);
      }
    }
  });
  return out;
}

// One element of x as float: bfloat16 or float32 storage.
template <typename T> inline float load(const T* p) { return static_cast<float>(*p); }

// x [..., D] (contiguous; bfloat16 or float32) normalised by its root mean square in float32, times
// the float32 weight [D], rounded once to x's dtype: transformers' RMSNorm, in one op a row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
              x.dim() >= 1 && x.device().is_cpu() && weight.device().is_cpu(),
              "rms_norm: x must be contiguous bfloat16 or float32 [..., D] on the CPU; got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == at::kFloat &&
              weight.is_contiguous(), "rms_norm: weight must be float32 [", x.size(-1), "]; got ", weight.sizes());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const float* w = weight.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float sum = 0.f;
        for (int64_t i = 0; i < D; ++i) { const float h = load(in + r * D + i); sum += h * h; }
        const float scale = 1.f / std::sqrt(sum / D + static_cast<float>(eps));
        for (int64_t i = 0; i < D; ++i) o[r * D + i] = static_cast<scalar_t>(w[i] * (load(in + r * D + i) * scale));
      }
    });
  });
  return out;
}

// RoPE in place on q [B, T, H, 2u] and k [B, T, G, 2u] (last dim contiguous; bfloat16 or float32),
// each KV group's channels turning at the columns ``channels`` [G * 2u] of cos and sin ([T, d/2] or
// [B, T, d/2], float32); query head h is in group h / (H / G). Rotate-half layout: channel c < u
// pairs with c + u. Computed in float32 and rounded once, as kernels/rope.py's torch path does.
template <typename scalar_t>
void rotate(const at::Tensor& x, const float* cos, const float* sin, int64_t table_b, int64_t table_t,
            const int64_t* channels, int64_t per_group) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), width = x.size(3), u = width / 2;
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  scalar_t* base = x.data_ptr<scalar_t>();
  std::vector<float> v(width);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cos + b * table_b + t * table_t;
      const float* s = sin + b * table_b + t * table_t;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t* p = base + b * sb + t * st + h * sh;
        const int64_t* ch = channels + (h / per_group) * width;
        for (int64_t i = 0; i < width; ++i) v[i] = load(p + i);
        for (int64_t i = 0; i < width; ++i) {
          const float rotated = i < u ? -v[i + u] : v[i - u];
          p[i] = static_cast<scalar_t>(v[i] * c[ch[i]] + rotated * s[ch[i]]);
        }
      }
    }
}

void rope_gather_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& channels) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
              q.size(3) == k.size(3) && q.size(3) % 2 == 0 && k.size(2) > 0 && q.size(2) % k.size(2) == 0 &&
              q.stride(3) == 1 && k.stride(3) == 1 && q.scalar_type() == k.scalar_type(),
              "rope_gather_: q [B, T, H, 2u] and k [B, T, G, 2u] of one dtype, last dim contiguous; got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes() && cos.is_contiguous() &&
              sin.is_contiguous() && (cos.dim() == 2 || (cos.dim() == 3 && cos.size(0) == q.size(0))) &&
              cos.size(-2) == q.size(1), "rope_gather_: cos and sin must be float32 [T, d/2] or [B, T, d/2]");
  TORCH_CHECK(channels.scalar_type() == at::kLong && channels.is_contiguous() &&
              channels.numel() == k.size(2) * k.size(3), "rope_gather_: channels must be int64 [G * 2u]");
  const int64_t half = cos.size(-1);
  const int64_t* ch = channels.data_ptr<int64_t>();
  for (int64_t i = 0; i < channels.numel(); ++i)
    TORCH_CHECK(ch[i] >= 0 && ch[i] < half, "rope_gather_: channels must index the tables' ", half,
                " columns; got ", ch[i]);
  const int64_t table_t = half, table_b = cos.dim() == 3 ? cos.size(1) * half : 0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "rope_gather_", [&] {
    rotate<scalar_t>(q, cos.data_ptr<float>(), sin.data_ptr<float>(), table_b, table_t, ch, q.size(2) / k.size(2));
    rotate<scalar_t>(k, cos.data_ptr<float>(), sin.data_ptr<float>(), table_b, table_t, ch, 1);
  });
}

}  // namespace

TORCH_LIBRARY(elastiq, m) {
  m.def("q4_matmul(Tensor x, Tensor codes, Tensor scales, int zero, bool portable=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_gather_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor channels) -> ()");
}
TORCH_LIBRARY_IMPL(elastiq, CPU, m) {
  m.impl("q4_matmul", q4_matmul);
  m.impl("rms_norm", rms_norm);
  m.impl("rope_gather_", rope_gather_);
}
