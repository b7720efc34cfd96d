// Halo attention on the CPU, one (image, query block, head) at a time, in cache.
//
// Inputs are the layer's two 1x1 projections in channels-last layout (computed by PyTorch's
// GEMM before this call): q (B, Hq, Wq, heads * dk) and kv (B, H, W, heads * (dk + dv)), per head
// k then v. For each block and head the kernel
//   1. copies the block's queries, and the keys (transposed, so that the logit loop runs along
//      keys in vector registers) and values of the window rows that overlap the map; within
//      those rows, pixels outside the map get zero keys and values, as in timm's zero padding;
//   2. computes q.k for those keys, and each query's logits against the height and width
//      tables (q @ [height_rel; width_rel].T, the same loop);
//   3. builds each query's logit row over the whole window: the position logit of every key,
//      plus q.k for the keys of the overlapping rows. Window rows wholly outside the map keep
//      only their position logit, exactly as in timm's HaloAttn, and cost no multiply-add, copy
//      or value; then the softmax over the row;
//   4. sums the values of the overlapping rows with those weights, writing straight into the
//      output tensor whatever its strides.
// Nothing of size (queries x window) leaves the core's cache, and no padded or unfolded copy of
// the projection is ever made.
//
// The vector code uses GCC's vector extensions (16 floats: one AVX-512 register, two AVX2 ones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr int kQueryGroup = 4;  // queries per register tile

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// One copy of the block function per x86 instruction set, chosen when the library loads, so a
// build made on one machine runs at full width on another; elsewhere the compiler's default.
#if defined(__x86_64__)
#define PER_INSTRUCTION_SET __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PER_INSTRUCTION_SET
#endif

ALWAYS_INLINE int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

ALWAYS_INLINE vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

ALWAYS_INLINE void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

ALWAYS_INLINE vfloat splat(float value) { return vfloat{} + value; }

// exp(x) for x <= 0 (logits minus their row maximum), Cephes' single-precision polynomial
// (about 1 ulp); below log(FLT_MIN) the result is exactly 0.
ALWAYS_INLINE vfloat vexp(vfloat x) {
  const vfloat lowest = splat(-87.33654475f);
  const vint underflow = x < lowest;
  x = x < lowest ? lowest : x;
  const vfloat magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat n = (x * 1.44269504088896341f + magic) - magic;
  const vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint exponent = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  __builtin_memcpy(&scale, &exponent, sizeof(scale));
  vint bits;
  __builtin_memcpy(&bits, &p, sizeof(bits));
  bits &= ~underflow;
  vfloat result;
  __builtin_memcpy(&result, &bits, sizeof(result));
  return result * scale;
}

// out[i][j..j+16) = sum_c a[i][c] * bt[c][j..j+16) for rows i of a (row stride lda) and the
// columns of bt (row stride ldb, a multiple of kLanes); rows and columns padded by the caller.
ALWAYS_INLINE void matmul_rows_by_columns(const float* a, int64_t rows, int64_t inner, int64_t lda,
                                          const float* bt, int64_t columns, int64_t ldb, float* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; i += kQueryGroup) {
    for (int64_t j = 0; j < columns; j += kLanes) {
      vfloat acc[kQueryGroup] = {};
      for (int64_t c = 0; c < inner; ++c) {
        const vfloat b = load(bt + c * ldb + j);
        for (int r = 0; r < kQueryGroup; ++r) acc[r] += a[(i + r) * lda + c] * b;
      }
      for (int r = 0; r < kQueryGroup; ++r) store(out + (i + r) * ldo + j, acc[r]);
    }
  }
}

// out[i][c..c+16*kChunks) = sum_j p[i][j] * v[j][c..): the weighted sum of value rows, vectorised
// along the value channels, kChunks vectors of them per register tile.
template <int kChunks>
ALWAYS_INLINE void weighted_sum(const float* p, int64_t rows, int64_t keys, int64_t ldp,
                                const float* v, int64_t channels, int64_t ldv, float* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; i += kQueryGroup) {
    for (int64_t c = 0; c < channels; c += kChunks * kLanes) {
      vfloat acc[kQueryGroup][kChunks] = {};
      for (int64_t j = 0; j < keys; ++j) {
        vfloat value[kChunks];
        for (int u = 0; u < kChunks; ++u) value[u] = load(v + j * ldv + c + u * kLanes);
        for (int r = 0; r < kQueryGroup; ++r) {
          const float weight = p[(i + r) * ldp + j];
          for (int u = 0; u < kChunks; ++u) acc[r][u] += weight * value[u];
        }
      }
      for (int r = 0; r < kQueryGroup; ++r)
        for (int u = 0; u < kChunks; ++u) store(out + (i + r) * ldo + c + u * kLanes, acc[r][u]);
    }
  }
}

struct Geometry {
  int64_t batch, height, width, q_height, q_width, heads, dk, dv, block, halo, query_block, win;
  float qk_scale, position_scale;
  int64_t q_channels() const { return heads * dk; }
  int64_t kv_channels() const { return heads * (dk + dv); }
};

// Per-thread scratch buffers, sized once per parallel chunk. Keys are kept in window order
// (row-major over the win x win window); logit rows get kLanes floats of slack for the
// overlapping vector stores that build them.
struct Scratch {
  int64_t queries, keys_padded, dv_padded, rel_padded, row_padded;
  std::vector<float> q, kt, v, qk, rel, row, p, out;

  explicit Scratch(const Geometry& g) {
    queries = round_up(g.query_block * g.query_block, kQueryGroup);
    keys_padded = round_up(g.win * g.win, kLanes);
    dv_padded = round_up(g.dv, kLanes);
    rel_padded = round_up(2 * (2 * g.win - 1), kLanes) + kLanes;
    row_padded = keys_padded + kLanes;
    q.assign(queries * g.dk, 0.f);
    kt.assign(g.dk * keys_padded, 0.f);
    v.assign(keys_padded * dv_padded, 0.f);
    qk.assign(queries * keys_padded, 0.f);
    rel.assign(queries * rel_padded, 0.f);
    row.assign(row_padded, 0.f);
    p.assign(queries * keys_padded, 0.f);
    out.assign(queries * dv_padded, 0.f);
  }
};

ALWAYS_INLINE float horizontal_sum(vfloat v) {
  float total = 0.f;
  for (int u = 0; u < kLanes; ++u) total += v[u];
  return total;
}

ALWAYS_INLINE float horizontal_max(vfloat v) {
  float best = v[0];
  for (int u = 1; u < kLanes; ++u) best = std::max(best, v[u]);
  return best;
}

PER_INSTRUCTION_SET
void attend_block(const Geometry& g, const float* q_proj, const float* kv_proj, const float* rel_table,
                  float* out, const int64_t* out_strides, int64_t b, int64_t by, int64_t bx, int64_t h, Scratch& s) {
  const int64_t bq = g.query_block, win = g.win, n_queries = bq * bq, rel_size = 2 * win - 1;
  const int64_t n_keys = win * win;

  // 1. Queries of the block; keys (transposed) and values of the window rows that overlap the
  //    map. Keys of those rows outside the map are zero (their q.k is 0, as with timm's zero
  //    padding); window rows wholly outside the map take no part in q.k or in the weighted sum.
  for (int64_t qy = 0; qy < bq; ++qy)
    for (int64_t qx = 0; qx < bq; ++qx) {
      const float* src = q_proj + (((b * g.q_height + by * bq + qy) * g.q_width + bx * bq + qx) * g.q_channels()
                                   + h * g.dk);
      std::copy(src, src + g.dk, s.q.data() + (qy * bq + qx) * g.dk);
    }
  const int64_t top = by * g.block - g.halo, left = bx * g.block - g.halo;
  const int64_t y_lo = std::max<int64_t>(0, -top), y_hi = std::min<int64_t>(win, g.height - top);
  const int64_t x_lo = std::max<int64_t>(0, -left), x_hi = std::min<int64_t>(win, g.width - left);
  const int64_t k_first = y_lo * win, n_in_rows = (y_hi - y_lo) * win;  // keys of the overlapping rows
  for (int64_t ky = y_lo; ky < y_hi; ++ky)
    for (int64_t kx = 0; kx < win; ++kx) {
      const int64_t j = ky * win + kx - k_first;
      float* v_row = s.v.data() + j * s.dv_padded;
      if (kx < x_lo || kx >= x_hi) {
        for (int64_t c = 0; c < g.dk; ++c) s.kt[c * s.keys_padded + j] = 0.f;
        std::fill(v_row, v_row + g.dv, 0.f);
        continue;
      }
      const float* src = kv_proj + (((b * g.height + top + ky) * g.width + left + kx) * g.kv_channels()
                                    + h * (g.dk + g.dv));
      for (int64_t c = 0; c < g.dk; ++c) s.kt[c * s.keys_padded + j] = src[c];
      std::copy(src + g.dk, src + g.dk + g.dv, v_row);
    }

  const int64_t n_in_rows_padded = round_up(n_in_rows, kLanes);
  for (int64_t c = 0; c < g.dk; ++c)  // q.k of the vector lanes past those rows must be exactly 0
    std::fill(s.kt.data() + c * s.keys_padded + n_in_rows, s.kt.data() + c * s.keys_padded + n_in_rows_padded, 0.f);

  // 2. q.k for those keys, and q against every row of both position tables.
  matmul_rows_by_columns(s.q.data(), s.queries, g.dk, g.dk, s.kt.data(), n_in_rows_padded,
                         s.keys_padded, s.qk.data(), s.keys_padded);
  matmul_rows_by_columns(s.q.data(), s.queries, g.dk, g.dk, rel_table, s.rel_padded - kLanes, s.rel_padded - kLanes,
                         s.rel.data(), s.rel_padded);

  // 3. Per query: the logit row over the whole window (position logit of every key, plus the
  //    scaled q.k of the keys in the overlapping rows), softmax, and the weights of those keys.
  const vfloat position_scale = splat(g.position_scale), qk_scale = splat(g.qk_scale);
  float* row = s.row.data();
  for (int64_t i = 0; i < n_queries; ++i) {
    const int64_t qy = i / bq, qx = i % bq;
    const float* height_logits = s.rel.data() + i * s.rel_padded + (win - 1 - qy);
    const float* width_logits = s.rel.data() + i * s.rel_padded + rel_size + (win - 1 - qx);
    // Row ky is height_logits[ky] + width_logits[0..win); each 16-lane store spills into the
    // next row, which the next store overwrites (win <= 16; wider windows take the scalar loop).
    if (win <= kLanes) {
      const vfloat widths = load(width_logits);
      for (int64_t ky = 0; ky < win; ++ky) store(row + ky * win, (widths + height_logits[ky]) * position_scale);
    } else {
      for (int64_t ky = 0; ky < win; ++ky)
        for (int64_t kx = 0; kx < win; ++kx)
          row[ky * win + kx] = (height_logits[ky] + width_logits[kx]) * g.position_scale;
    }
    const float* qk = s.qk.data() + i * s.keys_padded;
    for (int64_t j = 0; j < n_in_rows; j += kLanes)  // lanes past the rows add 0
      store(row + k_first + j, load(row + k_first + j) + load(qk + j) * qk_scale);
    std::fill(row + n_keys, row + s.row_padded, -1e30f);  // exp gives exactly 0 there

    vfloat best = load(row);
    for (int64_t k = kLanes; k < s.keys_padded; k += kLanes) {
      const vfloat x = load(row + k);
      best = x > best ? x : best;
    }
    const vfloat row_max = splat(horizontal_max(best));
    vfloat total = {};
    for (int64_t k = 0; k < s.keys_padded; k += kLanes) {
      const vfloat e = vexp(load(row + k) - row_max);
      store(row + k, e);
      total += e;
    }
    const vfloat inverse = splat(1.f / horizontal_sum(total));
    float* p = s.p.data() + i * s.keys_padded;
    for (int64_t j = 0; j < n_in_rows; j += kLanes) store(p + j, load(row + k_first + j) * inverse);
  }

  // 4. Weighted sum of the values of the overlapping rows, then the write into the output's layout.
  if (s.dv_padded % (4 * kLanes) == 0)
    weighted_sum<4>(s.p.data(), s.queries, n_in_rows, s.keys_padded, s.v.data(), s.dv_padded, s.dv_padded,
                    s.out.data(), s.dv_padded);
  else if (s.dv_padded % (2 * kLanes) == 0)
    weighted_sum<2>(s.p.data(), s.queries, n_in_rows, s.keys_padded, s.v.data(), s.dv_padded, s.dv_padded,
                    s.out.data(), s.dv_padded);
  else
    weighted_sum<1>(s.p.data(), s.queries, n_in_rows, s.keys_padded, s.v.data(), s.dv_padded, s.dv_padded,
                    s.out.data(), s.dv_padded);
  for (int64_t i = 0; i < n_queries; ++i) {
    const int64_t y = by * bq + i / bq, x = bx * bq + i % bq;
    float* dst = out + b * out_strides[0] + h * g.dv * out_strides[1] + y * out_strides[2] + x * out_strides[3];
    const float* src = s.out.data() + i * s.dv_padded;
    for (int64_t c = 0; c < g.dv; ++c) dst[c * out_strides[1]] = src[c];
  }
}

void halo_attention_cpu(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& height_rel,
                        const at::Tensor& width_rel, at::Tensor& out, int64_t heads, int64_t block, int64_t halo,
                        int64_t block_stride, double qk_scale, double position_scale) {
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu() && out.device().is_cpu(), "halo_attention_cpu: CPU tensors only");
  for (const at::Tensor& t : {q, kv, height_rel, width_rel, static_cast<const at::Tensor&>(out)})
    TORCH_CHECK(t.scalar_type() == at::kFloat, "halo_attention_cpu: float32 tensors only");
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 4 && out.dim() == 4, "halo_attention_cpu: q, kv and out must be 4-d");
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && height_rel.is_contiguous() && width_rel.is_contiguous(),
              "halo_attention_cpu: q, kv and the position tables must be contiguous");
  Geometry g{};
  g.batch = kv.size(0);
  g.height = kv.size(1);
  g.width = kv.size(2);
  g.q_height = q.size(1);
  g.q_width = q.size(2);
  g.heads = heads;
  g.dk = height_rel.size(1);
  g.dv = kv.size(3) / heads - g.dk;
  g.block = block;
  g.halo = halo;
  g.query_block = block / block_stride;
  g.win = block + 2 * halo;
  g.qk_scale = static_cast<float>(qk_scale);
  g.position_scale = static_cast<float>(position_scale);
  const int64_t nh = g.height / block, nw = g.width / block;
  TORCH_CHECK(g.height % block == 0 && g.width % block == 0 && block % block_stride == 0,
              "halo_attention_cpu: the map must divide into blocks, and blocks by the stride");
  TORCH_CHECK(height_rel.size(0) == 2 * g.win - 1 && width_rel.sizes() == height_rel.sizes(),
              "halo_attention_cpu: position tables must be (2 * win - 1, dk)");
  TORCH_CHECK(kv.size(3) == heads * (g.dk + g.dv) && g.dv > 0, "halo_attention_cpu: kv channels do not split into heads");
  TORCH_CHECK(q.size(0) == g.batch && q.size(1) == nh * g.query_block && q.size(2) == nw * g.query_block
              && q.size(3) == heads * g.dk, "halo_attention_cpu: q does not match kv's blocks");
  TORCH_CHECK(out.size(0) == g.batch && out.size(1) == heads * g.dv && out.size(2) == q.size(1)
              && out.size(3) == q.size(2), "halo_attention_cpu: out has the wrong shape");

  // Both position tables, transposed into one (dk, rows) matrix: the position logits of a query
  // are then the same register-tiled loop as its key logits.
  const int64_t rel_size = 2 * g.win - 1, rel_padded = round_up(2 * rel_size, kLanes);  // = Scratch's - kLanes
  std::vector<float> rel_table(g.dk * rel_padded, 0.f);
  const float* hr = height_rel.data_ptr<float>();
  const float* wr = width_rel.data_ptr<float>();
  for (int64_t r = 0; r < rel_size; ++r)
    for (int64_t c = 0; c < g.dk; ++c) {
      rel_table[c * rel_padded + r] = hr[r * g.dk + c];
      rel_table[c * rel_padded + rel_size + r] = wr[r * g.dk + c];
    }

  const float* q_ptr = q.data_ptr<float>();
  const float* kv_ptr = kv.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t out_strides[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const int64_t tasks = g.batch * nh * nw * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(g);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % heads, bx = t / heads % nw, by = t / heads / nw % nh, b = t / heads / nw / nh;
      attend_block(g, q_ptr, kv_ptr, rel_table.data(), out_ptr, out_strides, b, by, bx, h, scratch);
    }
  });
}

}  // namespace

TORCH_LIBRARY(halonet, m) {
  m.def("halo_attention_cpu(Tensor q, Tensor kv, Tensor height_rel, Tensor width_rel, Tensor(a!) out, "
        "int heads, int block, int halo, int block_stride, float qk_scale, float position_scale) -> ()");
}

TORCH_LIBRARY_IMPL(halonet, CPU, m) { m.impl("halo_attention_cpu", &halo_attention_cpu); }
