// Halo attention on the CPU, one (image, query block, head) at a time, in cache.
//
// Inputs are the layer's two 1x1 projections in channels-last layout (computed by PyTorch's
// GEMM before this call): q (B, Hq, Wq, heads * dk) and kv (B, H, W, heads * (dk + dv)), per head
// k then v. Queries live in vector lanes: 16 queries of a block per vector, up to 4 vectors per
// register tile. Keys and values are read where the projection holds them, one scalar at a time
// broadcast against the query vectors, so nothing is gathered, padded or transposed but the
// block's own queries. For each block and head the kernel
//   1. computes each query's logits against every row of both position tables and picks, per
//      query, the rows its window keys use (height by key row, width by key column);
//   2. builds the logits of every window key: its position logit, plus the scaled q.k for keys
//      inside the map. Keys in the zero-padded halo keep only their position logit, exactly as
//      in timm's HaloAttn, and cost no multiply-add;
//   3. softmax over the window, per query lane;
//   4. sums the values of the keys inside the map with those weights, and writes the result
//      straight into the output tensor whatever its strides.
// Nothing of size (queries x window) leaves the core's cache.
//
// The vector code uses GCC's vector extensions (16 floats: one AVX-512 register, two AVX2 ones).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;  // queries per vector
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
constexpr int kMaxGroups = 4;  // query vectors per register tile: 64 queries, a whole 8x8 block
constexpr int kRowsPerTile = 4;  // keys (or table rows, or value channels) per register tile

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// One copy of the block function per x86 instruction set, chosen when the library loads, so a
// build made on one machine runs at full width on another; elsewhere the compiler's default.
#if defined(__x86_64__)
#define PER_INSTRUCTION_SET __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PER_INSTRUCTION_SET
#endif

ALWAYS_INLINE vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

ALWAYS_INLINE void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

ALWAYS_INLINE vfloat splat(float value) { return vfloat{} + value; }

// exp(x) for x <= 0 (logits minus their maximum), Cephes' single-precision polynomial (about
// 1 ulp); below log(FLT_MIN) the result is exactly 0.
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

// acc[t][g] = sum_c rows[t][c] * queries[g][c][lanes]: kRowsPerTile dot products (keys, or rows
// of the position tables) against G vectors of queries; queries is (G, dim, kLanes).
template <int G>
ALWAYS_INLINE void dot_tile(const float* const* rows, const float* queries, int64_t dim,
                            vfloat (&acc)[kRowsPerTile][G]) {
  for (int t = 0; t < kRowsPerTile; ++t)
    for (int g = 0; g < G; ++g) acc[t][g] = vfloat{};
  for (int64_t c = 0; c < dim; ++c) {
    vfloat q[G];
    for (int g = 0; g < G; ++g) q[g] = load(queries + (g * dim + c) * kLanes);
    for (int t = 0; t < kRowsPerTile; ++t) {
      const float k = rows[t][c];
      for (int g = 0; g < G; ++g) acc[t][g] += k * q[g];
    }
  }
}

struct Geometry {
  int64_t batch, height, width, q_height, q_width, heads, dk, dv, block, halo, query_block, win;
  float qk_scale, position_scale;
  int64_t q_channels() const { return heads * dk; }
  int64_t kv_channels() const { return heads * (dk + dv); }
  int64_t rel_size() const { return 2 * win - 1; }
  int64_t queries() const { return query_block * query_block; }
  int64_t query_vectors() const { return (queries() + kLanes - 1) / kLanes; }
};

// Per-thread scratch, sized once per parallel chunk. Lane l of query vector g is query g * 16 + l.
struct Scratch {
  std::vector<float> queries;    // (query vectors, dk, lanes)
  std::vector<int64_t> qy, qx;   // each query's row and column in its block
  std::vector<float> rel;        // (kMaxGroups, 2 * rel_size, lanes): q against every table row
  std::vector<float> rh, rw;     // (kMaxGroups, win, lanes): position logit by key row / column
  std::vector<float> logits;     // (kMaxGroups, win * win, lanes), then the softmax weights
  std::vector<float> values;     // (kMaxGroups, dv, lanes): the weighted sums
  std::vector<float> zeros;      // stands in for the rows of a tile past the last one

  explicit Scratch(const Geometry& g)
      : queries(g.query_vectors() * g.dk * kLanes, 0.f), qy(g.query_vectors() * kLanes, 0),
        qx(g.query_vectors() * kLanes, 0), rel(kMaxGroups * 2 * g.rel_size() * kLanes),
        rh(kMaxGroups * g.win * kLanes), rw(kMaxGroups * g.win * kLanes),
        logits(kMaxGroups * g.win * g.win * kLanes), values(kMaxGroups * g.dv * kLanes),
        zeros(std::max(g.dk, g.dv) + kRowsPerTile, 0.f) {
    for (int64_t i = 0; i < g.queries(); ++i) {
      qy[i] = i / g.query_block;
      qx[i] = i % g.query_block;
    }
  }
};

// Where a block's window overlaps the map, in window coordinates [lo, hi).
struct Window {
  int64_t top, left, y_lo, y_hi, x_lo, x_hi;
};

// Steps 1-4 for G query vectors starting at vector g0 of one (image, block, head).
// One function, not four: the steps share the register tile acc, the queries and the scratch, read in order.
template <int G>
ALWAYS_INLINE void attend_queries(const Geometry& g, const float* kv_head, const float* rel_table, float* out,
                                  const int64_t* out_strides, const Window& w, int64_t g0, Scratch& s) {
  const int64_t win = g.win, rel_rows = 2 * g.rel_size(), n_keys = win * win, kv_row = g.width * g.kv_channels();
  const float* queries = s.queries.data() + g0 * g.dk * kLanes;
  const float* rows[kRowsPerTile];
  vfloat acc[kRowsPerTile][G];

  // 1. q against every row of [height_rel; width_rel], then per lane the rows its keys use.
  for (int64_t r = 0; r < rel_rows; r += kRowsPerTile) {
    for (int t = 0; t < kRowsPerTile; ++t) rows[t] = r + t < rel_rows ? rel_table + (r + t) * g.dk : s.zeros.data();
    dot_tile<G>(rows, queries, g.dk, acc);
    for (int t = 0; t < kRowsPerTile && r + t < rel_rows; ++t)
      for (int v = 0; v < G; ++v) store(s.rel.data() + (v * rel_rows + r + t) * kLanes, acc[t][v]);
  }
  for (int v = 0; v < G; ++v)
    for (int l = 0; l < kLanes; ++l) {
      const int64_t i = (g0 + v) * kLanes + l;
      const float* rel = s.rel.data() + v * rel_rows * kLanes + l;
      for (int64_t k = 0; k < win; ++k) {
        s.rh[(v * win + k) * kLanes + l] = rel[(k - s.qy[i] + win - 1) * kLanes] * g.position_scale;
        s.rw[(v * win + k) * kLanes + l] = rel[(g.rel_size() + k - s.qx[i] + win - 1) * kLanes] * g.position_scale;
      }
    }

  // 2. Logits of every window key: position, plus the scaled q.k inside the map.
  const vfloat qk_scale = splat(g.qk_scale);
  for (int64_t ky = 0; ky < win; ++ky) {
    for (int v = 0; v < G; ++v) {
      const vfloat height = load(s.rh.data() + (v * win + ky) * kLanes);
      for (int64_t kx = 0; kx < win; ++kx)
        store(s.logits.data() + (v * n_keys + ky * win + kx) * kLanes,
              height + load(s.rw.data() + (v * win + kx) * kLanes));
    }
    if (ky < w.y_lo || ky >= w.y_hi) continue;
    const float* kv_y = kv_head + (w.top + ky) * kv_row;
    for (int64_t kx = w.x_lo; kx < w.x_hi; kx += kRowsPerTile) {
      for (int t = 0; t < kRowsPerTile; ++t)
        rows[t] = kx + t < w.x_hi ? kv_y + (w.left + kx + t) * g.kv_channels() : s.zeros.data();
      dot_tile<G>(rows, queries, g.dk, acc);
      for (int t = 0; t < kRowsPerTile && kx + t < w.x_hi; ++t)
        for (int v = 0; v < G; ++v) {
          float* logit = s.logits.data() + (v * n_keys + ky * win + kx + t) * kLanes;
          store(logit, load(logit) + acc[t][v] * qk_scale);
        }
    }
  }

  // 3. Softmax over the window, per lane.
  vfloat inverse[G];
  for (int v = 0; v < G; ++v) {
    float* logits = s.logits.data() + v * n_keys * kLanes;
    vfloat best = load(logits);
    for (int64_t k = 1; k < n_keys; ++k) {
      const vfloat x = load(logits + k * kLanes);
      best = x > best ? x : best;
    }
    vfloat total = {};
    for (int64_t k = 0; k < n_keys; ++k) {
      const vfloat e = vexp(load(logits + k * kLanes) - best);
      store(logits + k * kLanes, e);
      total += e;
    }
    inverse[v] = 1.f / total;
  }

  // 4. Weighted sum of the values inside the map, kRowsPerTile channels at a time.
  for (int64_t c = 0; c < g.dv; c += kRowsPerTile) {
    for (int t = 0; t < kRowsPerTile; ++t)
      for (int v = 0; v < G; ++v) acc[t][v] = vfloat{};
    for (int64_t ky = w.y_lo; ky < w.y_hi; ++ky) {
      const float* kv_y = kv_head + (w.top + ky) * kv_row + g.dk + c;
      for (int64_t kx = w.x_lo; kx < w.x_hi; ++kx) {
        const float* value = kv_y + (w.left + kx) * g.kv_channels();
        vfloat weight[G];
        for (int v = 0; v < G; ++v) weight[v] = load(s.logits.data() + (v * n_keys + ky * win + kx) * kLanes);
        for (int t = 0; t < kRowsPerTile; ++t) {
          const float x = c + t < g.dv ? value[t] : 0.f;
          for (int v = 0; v < G; ++v) acc[t][v] += x * weight[v];
        }
      }
    }
    for (int t = 0; t < kRowsPerTile && c + t < g.dv; ++t)
      for (int v = 0; v < G; ++v) store(s.values.data() + (v * g.dv + c + t) * kLanes, acc[t][v] * inverse[v]);
  }
  for (int v = 0; v < G; ++v)
    for (int l = 0; l < kLanes && (g0 + v) * kLanes + l < g.queries(); ++l) {
      const int64_t i = (g0 + v) * kLanes + l;
      float* dst = out + s.qy[i] * out_strides[2] + s.qx[i] * out_strides[3];
      for (int64_t c = 0; c < g.dv; ++c) dst[c * out_strides[1]] = s.values[(v * g.dv + c) * kLanes + l];
    }
}

PER_INSTRUCTION_SET
void attend_block(const Geometry& g, const float* q_proj, const float* kv_proj, const float* rel_table,
                  float* out, const int64_t* out_strides, int64_t b, int64_t by, int64_t bx, int64_t h, Scratch& s) {
  const int64_t bq = g.query_block, win = g.win;
  for (int64_t i = 0; i < g.queries(); ++i) {  // the block's queries, transposed into lanes
    const float* src = q_proj + (((b * g.q_height + by * bq + s.qy[i]) * g.q_width + bx * bq + s.qx[i]) * g.q_channels()
                                 + h * g.dk);
    float* dst = s.queries.data() + (i / kLanes) * g.dk * kLanes + i % kLanes;
    for (int64_t c = 0; c < g.dk; ++c) dst[c * kLanes] = src[c];
  }
  Window w;
  w.top = by * g.block - g.halo;
  w.left = bx * g.block - g.halo;
  w.y_lo = std::max<int64_t>(0, -w.top);
  w.y_hi = std::min<int64_t>(win, g.height - w.top);
  w.x_lo = std::max<int64_t>(0, -w.left);
  w.x_hi = std::min<int64_t>(win, g.width - w.left);
  const float* kv_head = kv_proj + b * g.height * g.width * g.kv_channels() + h * (g.dk + g.dv);
  float* out_block = out + b * out_strides[0] + h * g.dv * out_strides[1] + by * bq * out_strides[2]
                     + bx * bq * out_strides[3];
  for (int64_t g0 = 0; g0 < g.query_vectors(); g0 += kMaxGroups) {
    switch (std::min<int64_t>(kMaxGroups, g.query_vectors() - g0)) {
      case 1: attend_queries<1>(g, kv_head, rel_table, out_block, out_strides, w, g0, s); break;
      case 2: attend_queries<2>(g, kv_head, rel_table, out_block, out_strides, w, g0, s); break;
      case 3: attend_queries<3>(g, kv_head, rel_table, out_block, out_strides, w, g0, s); break;
      default: attend_queries<4>(g, kv_head, rel_table, out_block, out_strides, w, g0, s); break;
    }
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

  // Both position tables stacked, (2 * rel_size, dk): the position logits of a query are then
  // the same register tile as its key logits.
  const at::Tensor rel_table = at::cat({height_rel, width_rel}).contiguous();

  const float* q_ptr = q.data_ptr<float>();
  const float* kv_ptr = kv.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t out_strides[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const int64_t tasks = g.batch * nh * nw * heads;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(g);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % heads, bx = t / heads % nw, by = t / heads / nw % nh, b = t / heads / nw / nh;
      attend_block(g, q_ptr, kv_ptr, rel_table.data_ptr<float>(), out_ptr, out_strides, b, by, bx, h, scratch);
    }
  });
}

}  // namespace

TORCH_LIBRARY(halonet, m) {
  m.def("halo_attention_cpu(Tensor q, Tensor kv, Tensor height_rel, Tensor width_rel, Tensor(a!) out, "
        "int heads, int block, int halo, int block_stride, float qk_scale, float position_scale) -> ()");
}

TORCH_LIBRARY_IMPL(halonet, CPU, m) { m.impl("halo_attention_cpu", &halo_attention_cpu); }
