// elastiq's CPU ops, built once per machine by kernels/cpu_ops.py and registered as torch.ops.elastiq.*:
//
// q4_matmul: a GGUF Q4_0 matrix by bfloat16 activations. The weight is the checkpoint's own blocks,
// row-major: codes [N, K/32, 16] (byte j of a block holds codes j and j + 16) and fp16 scales
// [N, K/32], w = (code - 8 + zero) * d. A row's stride may exceed K/32 blocks, so a matrix held at a
// wider rate multiplies as its first K/32 blocks. Each activation row is quantized per block of 32 to
// 12-bit codes and a float scale (16x finer than llama.cpp's 8-bit codes, which cost a measurable
// KL; the output's error stays that of its bf16 rounding), each code split into a signed high byte
// and a 4-bit low one, x = 16 h + l, so that the weights' unsigned codes multiply both with byte dot
// products: AVX-512 VNNI's dpbusd (two blocks an instruction; the high bytes meet the codes times
// 16, which still fit a byte, so the two products add with no shift), or AVX2's maddubs. Each lane
// of 4 codes is summed exactly in int32, starting from minus the activations' lane sum times
// (8 - zero) (the zero point), then scaled and accumulated in float32; the output is rounded to
// bfloat16 once. A portable loop computes the same sums without SIMD. Output rows are split among
// ATen's threads; the SIMD loops prefetch rows ahead, and prompts pass the weight in panels.
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
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ELASTIQ_X86 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kPacked = 16;
constexpr int kLane = 4;                // codes summed into one int32 lane
constexpr float kMaxCode = 2047.f;      // activations: 12-bit codes a block
constexpr int kLowBits = 4;             // x = 16 * hi + lo, lo in 0..15
// The SIMD loops ask for the weight rows this many tiles ahead (into L2) as they read a tile's: the
// hardware prefetcher alone kept a decode step's cold matrices at 20-33 GB/s of a 44 GB/s machine.
constexpr int kPrefetchTiles = 4;

// The instruction sets q4_matmul has loops for, best first.
enum class Isa { Avx512, Avx2, Portable };
const char* isa_name(Isa isa) { return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "portable"; }

bool cpu_has(Isa isa) {
  if (isa == Isa::Portable) return true;
#ifdef ELASTIQ_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return isa == Isa::Avx2 ? avx2 : avx512;
#else
  return false;
#endif
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Portable})
    if (cpu_has(isa)) names.emplace_back(isa_name(isa));
  return names;
}

Isa pick_isa(const std::string& name) {
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Portable})
    if (name == "auto" ? cpu_has(isa) : name == isa_name(isa)) {
      TORCH_CHECK(cpu_has(isa), "q4_matmul: this CPU cannot run isa '", name, "'; it runs ",
                  c10::Join(", ", cpu_isas()));
      return isa;
    }
  TORCH_CHECK(false, "q4_matmul: isa must be 'auto', 'avx512', 'avx2' or 'portable'; got '", name, "'");
}

struct Weights { const uint8_t* codes; const c10::Half* scales; int64_t cstride, sstride; int off; };

// Activation row c, block b: codes x = 16 * hi + lo (hi signed, lo in 0..15) at hi/lo [c * K + 32 b + j];
// for lane i (codes 4i..4i+3), its block's scale d [c * K/4 + i] and -off * (sum of its 4 codes) at
// lane_init, where a lane's sum starts.
struct Acts { const int8_t* hi; const int8_t* lo; const float* d; const int32_t* lane_init; int64_t K, blocks; };

// Blocks begin..end of the activations, quantized as ``Acts`` holds them. Inlined into a copy built
// for AVX2 as well, where the compiler vectorizes the rounding (the baseline x86-64 has no vector
// round, so its loop calls nearbyint element by element); both round half to even.
__attribute__((always_inline)) inline void quantize_blocks(const c10::BFloat16* x, int64_t begin, int64_t end,
                                                           int off, int8_t* hi, int8_t* lo, float* d,
                                                           int32_t* lane_init) {
  for (int64_t i = begin; i < end; ++i) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(x + i * kBlock);  // block i of the whole
    float f[kBlock], amax = 0.f;
    for (int j = 0; j < kBlock; ++j) {
      const uint32_t widened = static_cast<uint32_t>(bits[j]) << 16;  // a bfloat16 is a float's high half
      std::memcpy(&f[j], &widened, sizeof widened);
    }
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(f[j]));
    const float scale = amax / kMaxCode, inv = scale != 0.f ? 1.f / scale : 0.f;
    int q[kBlock];
    for (int j = 0; j < kBlock; ++j) q[j] = static_cast<int>(std::nearbyint(f[j] * inv));
    for (int j = 0; j < kBlock; ++j) {
      hi[i * kBlock + j] = static_cast<int8_t>(q[j] >> kLowBits);  // arithmetic shift: floor(q / 16)
      lo[i * kBlock + j] = static_cast<int8_t>(q[j] & ((1 << kLowBits) - 1));
    }
    for (int lane = 0; lane < kBlock / kLane; ++lane) {
      d[i * (kBlock / kLane) + lane] = scale;
      lane_init[i * (kBlock / kLane) + lane] =
          -off * (q[lane * kLane] + q[lane * kLane + 1] + q[lane * kLane + 2] + q[lane * kLane + 3]);
    }
  }
}

#ifdef ELASTIQ_X86
__attribute__((target("avx2,fma,f16c"))) void quantize_blocks_avx2(
    const c10::BFloat16* x, int64_t begin, int64_t end, int off, int8_t* hi, int8_t* lo, float* d, int32_t* lane_init) {
  quantize_blocks(x, begin, end, off, hi, lo, d, lane_init);
}
#endif

void quantize_rows(const c10::BFloat16* x, int64_t M, int64_t K, int off, int8_t* hi, int8_t* lo, float* d,
                   int32_t* lane_init, Isa isa) {
  at::parallel_for(0, M * (K / kBlock), 128, [&](int64_t begin, int64_t end) {
#ifdef ELASTIQ_X86
    if (isa != Isa::Portable) return quantize_blocks_avx2(x, begin, end, off, hi, lo, d, lane_init);
#endif
    quantize_blocks(x, begin, end, off, hi, lo, d, lane_init);
  });
}

// Rows n..n+R of the weight by activation rows m..m+C:
// out[r][c] = sum_b dw[r,b] * dx[c,b] * sum_j (code[r,b,j] - off) * x[c,b,j]
template <int R, int C>
void tile_portable(const Weights& w, const Acts& a, int64_t n, int64_t m, float out[R][C]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const uint8_t* codes = w.codes + (n + r) * w.cstride;
      const c10::Half* ws = w.scales + (n + r) * w.sstride;
      const int8_t* hi = a.hi + (m + c) * a.K;
      const int8_t* lo = a.lo + (m + c) * a.K;
      float acc = 0.f;
      for (int64_t b = 0; b < a.blocks; ++b) {
        auto x = [&](int j) { return hi[b * kBlock + j] * (1 << kLowBits) + lo[b * kBlock + j]; };
        int s = 0;
        for (int j = 0; j < kPacked; ++j) {
          const int byte = codes[b * kPacked + j];
          s += ((byte & 0x0F) - w.off) * x(j) + ((byte >> 4) - w.off) * x(j + kPacked);
        }
        acc += static_cast<float>(ws[b]) * a.d[(m + c) * (a.K / kLane) + b * (kBlock / kLane)] * s;
      }
      out[r][c] = acc;
    }
}

#ifdef ELASTIQ_X86
#define ELASTIQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define ELASTIQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

ELASTIQ_AVX2 inline float hsum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

// Block b of row ``row``'s codes kPrefetchTiles tiles of R rows ahead, into L2 (past the matrix's
// end it asks for nothing that matters: a prefetch never faults).
template <int R>
inline void prefetch_ahead(const Weights& w, int64_t row, int64_t b) {
  _mm_prefetch(reinterpret_cast<const char*>(w.codes + (row + kPrefetchTiles * R) * w.cstride + b * kPacked),
               _MM_HINT_T1);
}

// One block's 32 codes as unsigned bytes in order (codes 0..15 from the low nibbles, 16..31 from the high).
ELASTIQ_AVX2 inline __m256i codes_of(const uint8_t* block) {
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
  return _mm256_and_si256(_mm256_srlv_epi64(raw, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F));
}

// The exact int32 lane sums of one block: sum over each lane's 4 codes of (code - off) * x.
ELASTIQ_AVX2 inline __m256i lanes_avx2(__m256i codes, const Acts& a, int64_t c, int64_t b) {
  const int64_t at = c * a.K + b * kBlock;
  const __m256i h = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.hi + at)));
  const __m256i l = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.lo + at)));
  const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(h, _mm256_set1_epi16(1 << kLowBits)),
                                        _mm256_madd_epi16(l, _mm256_set1_epi16(1)));
  return _mm256_add_epi32(sums, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.lane_init + at / kLane)));
}

template <int R, int C>
ELASTIQ_AVX2 void tile_avx2(const Weights& w, const Acts& a, int64_t n, int64_t m, float out[R][C]) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.blocks; ++b) {
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      prefetch_ahead<R>(w, n + r, b);
      const __m256i codes = codes_of(w.codes + (n + r) * w.cstride + b * kPacked);
      const __m256 dw = _mm256_set1_ps(_cvtsh_ss(w.scales[(n + r) * w.sstride + b].x));
      _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) {
        const __m256 dx = _mm256_loadu_ps(a.d + (m + c) * (a.K / kLane) + b * (kBlock / kLane));
        const __m256i sums = lanes_avx2(codes, a, m + c, b);
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dw, dx), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) out[r][c] = hsum(acc[r][c]);
}

// Two blocks at once: 64 codes in a 512-bit register (lanes 0-7 block b, 8-15 block b + 1), multiplied
// with dpbusd; an odd last block takes the AVX2 step.
template <int R, int C>
ELASTIQ_AVX512 void tile_avx512(const Weights& w, const Acts& a, int64_t n, int64_t m, float out[R][C]) {
  const __m512i shift = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4), low = _mm512_set1_epi8(0x0F);
  const __m512i pairs = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= a.blocks; b += 2) {
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      prefetch_ahead<R>(w, n + r, b);
      const __m512i raw = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.codes + (n + r) * w.cstride + b * kPacked)));
      const __m512i codes = _mm512_and_si512(_mm512_srlv_epi64(_mm512_shuffle_i64x2(raw, raw, 0x50), shift), low);
      const __m512i codes16 = _mm512_slli_epi16(codes, kLowBits);  // at most 240: still an unsigned byte
      uint32_t two;
      std::memcpy(&two, w.scales + (n + r) * w.sstride + b, sizeof two);
      const __m512 dw = _mm512_permutexvar_ps(pairs, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));
      _Pragma("GCC unroll 8") for (int c = 0; c < C; ++c) {
        const int64_t at = (m + c) * a.K + b * kBlock;
        const __m512 dx = _mm512_loadu_ps(a.d + at / kLane);
        const __m512i h = _mm512_dpbusd_epi32(_mm512_loadu_si512(a.lane_init + at / kLane), codes16,
                                              _mm512_loadu_si512(a.hi + at));
        const __m512i sums = _mm512_dpbusd_epi32(h, codes, _mm512_loadu_si512(a.lo + at));
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(dw, dx), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float tail = 0.f;
      if (b < a.blocks) {  // an odd block count: the last block
        const __m256i sums = lanes_avx2(codes_of(w.codes + (n + r) * w.cstride + b * kPacked), a, m + c, b);
        const __m256 dx = _mm256_loadu_ps(a.d + (m + c) * (a.K / kLane) + b * (kBlock / kLane));
        tail = _cvtsh_ss(w.scales[(n + r) * w.sstride + b].x) * hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), dx));
      }
      out[r][c] = _mm512_reduce_add_ps(acc[r][c]) + tail;
    }
}

#endif

template <int R, int C>
void tile(const Weights& w, const Acts& a, Isa isa, int64_t n, int64_t m, int64_t N, c10::BFloat16* out) {
  float v[R][C];
#ifdef ELASTIQ_X86
  if (isa == Isa::Avx512) tile_avx512<R, C>(w, a, n, m, v); else if (isa == Isa::Avx2) tile_avx2<R, C>(w, a, n, m, v); else
#endif
  tile_portable<R, C>(w, a, n, m, v);
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) out[(m + c) * N + n + r] = c10::BFloat16(v[r][c]);
}

// Rows n0..n1 of the weight (a panel, whose weights stay in cache) times every activation row: each
// group of C activation rows passes the whole panel, two weight rows at a time, so that the
// activations (several bytes a weight row's worth) are read once a panel rather than once a tile.
template <int C>
void panel(const Weights& w, const Acts& a, Isa isa, int64_t n0, int64_t n1, int64_t M, int64_t N,
           c10::BFloat16* out) {
  auto rows = [&](auto cols, int64_t m) {
    constexpr int kCols = decltype(cols)::value;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) tile<2, kCols>(w, a, isa, n, m, N, out);
    for (; n < n1; ++n) tile<1, kCols>(w, a, isa, n, m, N, out);
  };
  int64_t m = 0;
  for (; m + C <= M; m += C) rows(std::integral_constant<int, C>{}, m);
  for (; m < M; ++m) rows(std::integral_constant<int, 1>{}, m);
}

// An index's values, checked to lie in 0..size-1 (``what`` names it in the error).
const int64_t* checked_index(const std::optional<at::Tensor>& index, int64_t size, const char* what) {
  if (!index) return nullptr;
  TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong && index->is_contiguous() &&
              index->device().is_cpu(), "q4_matmul: ", what, " must be a contiguous int64 vector on the CPU");
  const int64_t* v = index->data_ptr<int64_t>();
  for (int64_t i = 0; i < index->numel(); ++i)
    TORCH_CHECK(v[i] >= 0 && v[i] < size, "q4_matmul: ", what, " must index 0..", size - 1, "; got ", v[i]);
  return v;
}

// x [..., K] bf16 times the Q4_0 matrix of codes [N, >=K/32, 16] uint8 and scales [N, >=K/32] fp16
// (rows may be strided: a held matrix's first K/32 blocks), w = (code - 8 + zero) * d, plus bias [N]
// (bf16, added to the bf16-rounded product as torch adds bf16 tensors): [..., N] bf16. A matrix held
// in its checkpoint's unit order multiplies in the same call the model would otherwise make three:
// ``in_index`` [K] takes x[..., in_index] as the input (x's last dimension may then be any size),
// ``out_index`` [N'] returns the output's columns out_index (each in 0..N-1). ``isa`` picks the loop:
// "auto" (the best this CPU runs), or one of ``cpu_isas`` (the tests run each).
at::Tensor q4_matmul(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales, int64_t zero,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_index,
                     const std::optional<at::Tensor>& out_index, c10::string_view isa_name) {
  const int64_t K = in_index ? in_index->numel() : x_in.size(-1);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.scalar_type() == at::kBFloat16 && K % kBlock == 0,
              "q4_matmul: x must be bfloat16 [..., K], K a multiple of 32; got ", x_in.sizes(),
              in_index ? " gathered to K = " + std::to_string(K) : std::string());
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kPacked && codes.scalar_type() == at::kByte &&
              codes.stride(2) == 1 && codes.stride(1) == kPacked && codes.size(1) >= K / kBlock,
              "q4_matmul: codes must be uint8 [N, >=K/32, 16] with contiguous rows; got ", codes.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == codes.size(0) && scales.size(1) >= K / kBlock &&
              scales.scalar_type() == at::kHalf && scales.stride(1) == 1,
              "q4_matmul: scales must be float16 [N, >=K/32]; got ", scales.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && codes.device().is_cpu() && scales.device().is_cpu(),
              "q4_matmul runs on CPU tensors");
  TORCH_CHECK(zero == 0 || zero == 8, "q4_matmul: zero must be 0 or 8; got ", zero);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == codes.size(0) && bias->scalar_type() == at::kBFloat16 &&
                        bias->is_contiguous() && bias->device().is_cpu()),
              "q4_matmul: bias must be contiguous bfloat16 [", codes.size(0), "] on the CPU");
  const Isa isa = pick_isa(std::string(isa_name));
  const int64_t N = codes.size(0), blocks = K / kBlock;
  const int64_t* gather = checked_index(in_index, x_in.size(-1), "in_index");
  const int64_t* pick = checked_index(out_index, N, "out_index");
  at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(-1) ? x.numel() / x.size(-1) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = pick ? out_index->numel() : N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || shape.back() == 0) return out;
  if (gather) {  // the input in the matrix's order
    at::Tensor taken = at::empty({M, K}, x.options());
    const c10::BFloat16* from = x.data_ptr<c10::BFloat16>();
    c10::BFloat16* to = taken.data_ptr<c10::BFloat16>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) to[m * K + k] = from[m * x.size(-1) + gather[k]];
    x = taken;
  }
  const int off = static_cast<int>(8 - zero);
  std::vector<int8_t> hi(M * K), lo(M * K);
  std::vector<float> d(M * K / kLane);
  std::vector<int32_t> lane_init(M * K / kLane);
  quantize_rows(x.data_ptr<c10::BFloat16>(), M, K, off, hi.data(), lo.data(), d.data(), lane_init.data(), isa);
  const Weights w{codes.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), codes.stride(0), scales.stride(0), off};
  const Acts a{hi.data(), lo.data(), d.data(), lane_init.data(), K, blocks};
  at::Tensor full = pick ? at::empty({M, N}, x.options()) : out;  // the output before out_index picks
  auto* o = full.data_ptr<c10::BFloat16>();
  constexpr int kRows = 4;     // weight rows a one-row (decoding) tile multiplies
  constexpr int kPanel = 32;   // weight rows that every activation row passes in turn (prompts)
  if (M == 1) {
    const int64_t tiles_n = (N + kRows - 1) / kRows;
    at::parallel_for(0, tiles_n, std::max<int64_t>(1, 512 / std::max<int64_t>(1, blocks)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t * kRows;
        if (n + kRows <= N) tile<kRows, 1>(w, a, isa, n, 0, N, o);
        else for (int64_t r = n; r < N; ++r) tile<1, 1>(w, a, isa, r, 0, N, o);
      }
    });
  } else {
    at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) panel<4>(w, a, isa, p * kPanel, std::min<int64_t>(N, (p + 1) * kPanel), M, N, o);
    });
  }
  if (bias) {
    const c10::BFloat16* b = bias->data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) o[i] = c10::BFloat16(static_cast<float>(o[i]) + static_cast<float>(b[i % N]));
  }
  if (pick) {
    const int64_t picked = out_index->numel();
    c10::BFloat16* to = out.data_ptr<c10::BFloat16>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t p = 0; p < picked; ++p) to[m * picked + p] = o[m * N + pick[p]];
  }
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
  m.def("q4_matmul(Tensor x, Tensor codes, Tensor scales, int zero, Tensor? bias=None, Tensor? in_index=None, "
        "Tensor? out_index=None, str isa=\"auto\") -> Tensor");
  m.def("cpu_isas() -> str[]", cpu_isas);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_gather_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor channels) -> ()");
}
TORCH_LIBRARY_IMPL(elastiq, CPU, m) {
  m.impl("q4_matmul", q4_matmul);
  m.impl("rms_norm", rms_norm);
  m.impl("rope_gather_", rope_gather_);
}
