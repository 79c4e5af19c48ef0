// Native CPU backend of fastcal's calibrated prompt loss (TCPT): forward and backward fused
// around the GEMMs, ATen for the matrix products (MKL / oneDNN), OpenMP over rows for the rest.
//
// Notation (all rows L2-normalized inside): f (B, D) image, t (C, D) tuned text, t0 (C, D) frozen text,
// G = f t^T the cosines, z = s G the logits, y the labels, eps the label smoothing.
//   CE row i:   l_i = lse(z_i) - (1 - eps) z_iy - eps mean_c z_ic
//   margin:     m_i = z_iy - max_{c != y} z_ic,  r_i the runner-up's index
//   per row:    v_i = l_i - alpha m_i + beta (m_i - mean(m))^2 + w M,  so mean_i v_i = CE + R_margin + w M
//   moment:     M = ||mean t - mean t0||^2 + ||Cov(t) - Cov(t0)||_F^2,  Cov = A^T A / C for centered A.
//
// The loss is a weighted sum L = sum_i g_i v_i (g_i = 1/B for "mean", 1 for "sum", the incoming
// gradient for "none"). Its gradient with respect to G, row i, is
//   dL/dG_i = g_i J_i + kappa (e_{y_i} - e_{r_i}),
//   J_i = s [(p_i - q_i) + a_i (e_{y_i} - e_{r_i})],  a_i = -alpha + 2 beta (m_i - mean(m)),
// with p_i = softmax(z_i), q_i = (1 - eps) e_{y_i} + eps / C, and the coupling through mean(m)
//   kappa = -(2 beta / B) s sum_j g_j (m_j - mean(m)),
// which vanishes when g is uniform. The forward writes J over the cosine buffer in its row pass (one
// B x C buffer in all), so the backward is two GEMMs and the normalization's Jacobian.
//
// Moment term without the D x D pair Cov(t), Cov(t0): with S = A + B0 and Dl = A - B0 (A, B0 the
// centered tuned and frozen features), A^T A - B0^T B0 = (S^T Dl + Dl^T S) / 2 =: E, one GEMM instead of
// two, and no cancellation between two large covariances when the tuned features are close to the
// frozen ones. ||Cov(t) - Cov(t0)||_F^2 = ||E||_F^2 / C^2 and d/dA = (4 / C^2) A E. On the Gram side
// (C x C products, chosen when cheaper) with P = S S^T, Q = Dl Dl^T, N = Dl S^T:
//   ||E||_F^2 = (<P, Q> + <N, N^T>) / 2,   A E = ((P + N) Dl + (N^T + Q) S) / 4,
//   B0 E = ((P - N) Dl + (N^T - Q) S) / 4.
// dM/dt_c = 2 (mu - mu0) / C + (4 / C^2) (A E)_c (the centering drops out: the rows of A E sum to zero),
// dM/dt0_c = -2 (mu - mu0) / C - (4 / C^2) (B0 E)_c; computed in the forward, kept for the backward.
// Through x_hat = x / ||x||: dL/dx = (g - x_hat <x_hat, g>) / ||x||.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "row_exp.h"

#ifdef FASTCAL_WITH_ONEDNN
// Exported by libtorch_cpu (TORCH_API, ATen/native/mkldnn/Matmul.h, a header the wheel does not ship):
// result = beta * result + alpha * mat1 mat2, through oneDNN.
namespace at::native {
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace {

using at::Tensor;

constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionMean = 1;
constexpr int64_t kReductionSum = 2;

// Rows per parallel chunk: about 32k elements, so small problems stay on one thread.
int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width)); }

// The Gram side costs about 5 C^2 D multiply-adds (3 products for the value, 2 for the gradient), the
// D x D side 2 C D^2.
bool use_gram_side(int64_t C, int64_t D) { return 5 * C < 2 * D; }

// Matrix products. float32 products of at least 2^20 multiply-adds go to oneDNN when torch has it, the
// CPU has AVX-512 (the build defines FASTCAL_WITH_ONEDNN only then) and
// torch.backends.mkldnn is on: torch's own float32 mm calls MKL, which on the AMD (Zen 5) machine this
// was measured on runs at about the AVX2 rate, while oneDNN uses AVX-512 there (about 2.3x the
// throughput). The rest, float64 included, goes through at::mm / at::addmm.
bool use_onednn(const Tensor& a, const Tensor& b) {
#ifdef FASTCAL_WITH_ONEDNN
  return a.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn() &&
         a.size(0) * a.size(1) * b.size(1) >= (int64_t(1) << 20);
#else
  (void)a;
  (void)b;
  return false;
#endif
}

// a b
Tensor gemm(const Tensor& a, const Tensor& b) {
#ifdef FASTCAL_WITH_ONEDNN
  if (use_onednn(a, b)) {
    Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
    return out;
  }
#endif
  return at::mm(a, b);
}

// beta c + alpha a b (c may broadcast to the product's shape)
Tensor gemm_add(const Tensor& c, const Tensor& a, const Tensor& b, double beta, double alpha) {
#ifdef FASTCAL_WITH_ONEDNN
  if (use_onednn(a, b)) {
    Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    out.copy_(c);
    at::native::mkldnn_matmul(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
    return out;
  }
#endif
  return at::addmm(c, a, b, beta, alpha);
}

// rn_i = 1 / ||x_i|| and, when dst is given, dst_i = x_i / ||x_i||.
template <typename T>
void normalize_rows_impl(const T* src, T* dst, T* rn, int64_t n, int64_t d) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = src + i * d;
      T ssq = 0;
#pragma omp simd reduction(+ : ssq)
      for (int64_t k = 0; k < d; ++k) ssq += row[k] * row[k];
      const T inv = T(1) / std::sqrt(ssq);
      rn[i] = inv;
      if (dst) {
        T* o = dst + i * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) o[k] = row[k] * inv;
      }
    }
  });
}

std::vector<Tensor> normalize_rows(const Tensor& x_in) {
  const Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  Tensor out = at::empty_like(x);
  Tensor rnorm = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastcal_normalize_rows", [&] {
    normalize_rows_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rnorm.data_ptr<scalar_t>(), n, d);
  });
  return {out, rnorm};
}

// Gradient through x_hat = x / ||x||: grad_x = scale / ||x_i|| (g_i - x_hat_i <x_hat_i, g_i>). x is x_hat
// itself (normalized) or the raw rows, then x_hat = x / ||x|| is formed on the fly.
template <typename T>
void normalize_rows_backward_impl(const T* g, const T* x, const T* rn, bool normalized, T scale, T* o, int64_t n,
                                  int64_t d) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = g + i * d;
      const T* xi = x + i * d;
      const T to_hat = normalized ? T(1) : rn[i];
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < d; ++k) dot += gi[k] * xi[k];
      dot *= to_hat;
      const T factor = scale * rn[i];
      const T along = to_hat * dot;
      T* oi = o + i * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) oi[k] = factor * (gi[k] - xi[k] * along);
    }
  });
}

Tensor normalize_rows_backward(const Tensor& grad_hat_in, const Tensor& x, const Tensor& rnorm, double scale,
                               bool normalized) {
  const Tensor grad_hat = grad_hat_in.contiguous();
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastcal_normalize_rows_backward", [&] {
    normalize_rows_backward_impl<scalar_t>(grad_hat.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                           rnorm.data_ptr<scalar_t>(), normalized, static_cast<scalar_t>(scale),
                                           out.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return out;
}

// 1 / ||x_i|| for each row of a contiguous x.
Tensor inverse_row_norms(const Tensor& x) {
  Tensor rnorm = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastcal_inverse_row_norms", [&] {
    normalize_rows_impl<scalar_t>(x.data_ptr<scalar_t>(), nullptr, rnorm.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return rnorm;
}

// One pass over each row of cosines G: softmax statistics, target and runner-up, the row's CE, and (when
// write_grad) s (p - q) written over the row and h_i = sum_c (p_ic - q_ic) G_ic, the row's part of dL/ds.
template <typename T>
void ce_margin_rows(T* G, const int64_t* y, int64_t B, int64_t C, T s, T eps, bool write_grad, T* ce, T* g_target,
                    T* g_runner, int64_t* runner, T* h) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* g = G + i * C;
      const int64_t yi = y[i];
      const T gy = g[yi];
      T best = neg_inf;
#pragma omp simd reduction(max : best)
      for (int64_t c = 0; c < yi; ++c) best = g[c] > best ? g[c] : best;
#pragma omp simd reduction(max : best)
      for (int64_t c = yi + 1; c < C; ++c) best = g[c] > best ? g[c] : best;
      // first index attaining the runner-up value; a row of NaN has none: any valid index (the loss is NaN)
      int64_t r = 0;
      while (r < C && (r == yi || !(g[r] == best))) ++r;
      if (r == C) r = yi == 0 ? 1 : 0;
      const T gmax = gy > best ? gy : best;
      const fastcal::ExpSums<T> sums = fastcal::exp_sums<T>(g, C, s, gmax, write_grad);
      const T sum_e = sums.e, sum_eg = sums.eg, sum_g = sums.g;
      const T mean_g = sum_g / static_cast<T>(C);
      ce[i] = s * gmax + std::log(sum_e) - (1 - eps) * s * gy - eps * s * mean_g;
      g_target[i] = gy;
      g_runner[i] = best;
      runner[i] = r;
      if (write_grad) {
        const T inv = T(1) / sum_e;
        const T a = s * inv;
        const T b = s * eps / static_cast<T>(C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) g[c] = g[c] * a - b;
        g[yi] -= s * (1 - eps);
        h[i] = sum_eg * inv - (1 - eps) * gy - eps * mean_g;
      }
    }
  });
}

// S = A + B0 and Dl = A - B0 for A = t - mu, B0 = t0 / ||t0|| - mu0 (t0 raw, r0 its inverse row norms).
template <typename T>
void center_pair_impl(const T* t, const T* t0, const T* r0, const T* m, const T* m0, T* sp, T* dp, int64_t C,
                      int64_t D) {
  at::parallel_for(0, C, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t o = i * D;
      const T ri = r0[i];
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) {
        const T ak = t[o + k] - m[k];
        const T bk = t0[o + k] * ri - m0[k];
        sp[o + k] = ak + bk;
        dp[o + k] = ak - bk;
      }
    }
  });
}

// In place: (S, Dl) <- (A, B0) = ((S + Dl) / 2, (S - Dl) / 2).
template <typename T>
void split_sum_diff_impl(T* sp, T* dp, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t k = begin; k < end; ++k) {
      const T sk = sp[k], dk = dp[k];
      sp[k] = (sk + dk) * T(0.5);
      dp[k] = (sk - dk) * T(0.5);
    }
  });
}

// x (d, d) row-major <- (x + x^T) / 2, tile pair by tile pair (the lower tile transposed into a local
// buffer so every loop runs along rows); returns ||x||_F^2 after the update.
template <typename T>
double symmetrize_sq_norm(T* x, int64_t d) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (d + kTile - 1) / kTile;
  std::vector<double> partial(tiles, 0.0);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    T lower_t[kTile][kTile];
    for (int64_t bi = begin; bi < end; ++bi) {
      double acc = 0;
      const int64_t i0 = bi * kTile, ni = std::min(kTile, d - i0);
      for (int64_t bj = bi; bj < tiles; ++bj) {
        const int64_t j0 = bj * kTile, nj = std::min(kTile, d - j0);
        for (int64_t jj = 0; jj < nj; ++jj)  // lower_t[ii][jj] = x[j0 + jj][i0 + ii]
          for (int64_t ii = 0; ii < ni; ++ii) lower_t[ii][jj] = x[(j0 + jj) * d + i0 + ii];
        T tile_sq = 0;
        for (int64_t ii = 0; ii < ni; ++ii) {
          T* row = x + (i0 + ii) * d + j0;
#pragma omp simd reduction(+ : tile_sq)
          for (int64_t jj = 0; jj < nj; ++jj) {
            const T v = (row[jj] + lower_t[ii][jj]) * T(0.5);
            row[jj] = v;
            tile_sq += v * v;
          }
        }
        for (int64_t jj = 0; jj < nj; ++jj)  // mirror the updated tile into the lower one
          for (int64_t ii = 0; ii < ni; ++ii) x[(j0 + jj) * d + i0 + ii] = x[(i0 + ii) * d + j0 + jj];
        acc += (bi == bj ? 1.0 : 2.0) * static_cast<double>(tile_sq);
      }
      partial[bi] = acc;
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

// Moment term M and, on request, dM/dt_hat and dM/dt0_hat (see the header comment); t0 is the raw frozen
// features (contiguous), t0_rnorm their inverse row norms, so no normalized copy is formed.
std::vector<Tensor> moment_terms(const Tensor& t_hat, const Tensor& t0, const Tensor& t0_rnorm, bool need_t,
                                 bool need_t0) {
  const int64_t C = t_hat.size(0), D = t_hat.size(1);
  const bool gram = use_gram_side(C, D);
  const Tensor mu = t_hat.mean(0);
  const Tensor mu0 = at::mv(t0.t(), t0_rnorm).div_(static_cast<double>(C));
  const Tensor delta = mu - mu0;
  Tensor S = at::empty_like(t_hat), Dl = at::empty_like(t_hat);
  AT_DISPATCH_FLOATING_TYPES(t_hat.scalar_type(), "fastcal_center_pair", [&] {
    center_pair_impl<scalar_t>(t_hat.data_ptr<scalar_t>(), t0.data_ptr<scalar_t>(), t0_rnorm.data_ptr<scalar_t>(),
                               mu.data_ptr<scalar_t>(), mu0.data_ptr<scalar_t>(), S.data_ptr<scalar_t>(),
                               Dl.data_ptr<scalar_t>(), C, D);
  });
  const double inv_c2 = 1.0 / (static_cast<double>(C) * static_cast<double>(C));
  const Tensor mean_grad = (delta * (2.0 / static_cast<double>(C))).expand({C, D});
  Tensor gap, dM_dt, dM_dt0;
  if (gram) {
    const Tensor P = gemm(S, S.t());
    const Tensor Q = gemm(Dl, Dl.t());
    const Tensor N = gemm(Dl, S.t());
    const Tensor Nt = N.t().contiguous();
    gap = ((P * Q).sum() + (N * Nt).sum()) * (0.5 * inv_c2);
    // A E = ((P + N) Dl + (N^T + Q) S) / 4 and B0 E = ((P - N) Dl + (N^T - Q) S) / 4, times +-4 / C^2.
    if (need_t) dM_dt = gemm_add(gemm_add(mean_grad, Nt + Q, S, 1.0, inv_c2), P + N, Dl, 1.0, inv_c2);
    if (need_t0) dM_dt0 = gemm_add(gemm_add(-mean_grad, Nt - Q, S, 1.0, -inv_c2), P - N, Dl, 1.0, -inv_c2);
  } else {
    Tensor E = gemm(S.t(), Dl);
    double sq = 0;
    AT_DISPATCH_FLOATING_TYPES(E.scalar_type(), "fastcal_symmetrize", [&] {
      sq = symmetrize_sq_norm<scalar_t>(E.data_ptr<scalar_t>(), D);
      if (need_t || need_t0) split_sum_diff_impl<scalar_t>(S.data_ptr<scalar_t>(), Dl.data_ptr<scalar_t>(), C * D);
    });
    gap = at::scalar_tensor(sq * inv_c2, t_hat.options());
    const Tensor& A = S;    // now t - mu
    const Tensor& B0 = Dl;  // now t0 - mu0
    if (need_t) dM_dt = gemm_add(mean_grad, A, E, 1.0, 4.0 * inv_c2);
    if (need_t0) dM_dt0 = gemm_add(-mean_grad, B0, E, 1.0, -4.0 * inv_c2);
  }
  const Tensor value = delta.dot(delta) + gap;
  return {value, dM_dt, dM_dt0};
}

// Forward. Returns, in order: loss (0-dim, or (B,) for reduction "none"), ce (mean CE), margin
// (R_margin), moment (M, 0 without frozen features), then what the backward takes, in its order: J (or
// undefined), f_hat, f_rnorm, t_hat, t_rnorm, t0 (the raw frozen features), t0_rnorm, dM_dt, dM_dt0, labels,
// runner, h, margins.
std::vector<Tensor> forward(const Tensor& image, const Tensor& text, const c10::optional<Tensor>& frozen,
                            const Tensor& labels_in, double scale, double alpha, double beta, double label_smoothing,
                            double moment_weight, int64_t reduction, bool need_image_grad, bool need_text_grad,
                            bool need_frozen_grad, bool need_scale_grad) {
  TORCH_CHECK(image.dim() == 2 && text.dim() == 2 && image.size(1) == text.size(1),
              "fastcal native: expected image (B, D) and text (C, D)");
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), "fastcal native: image and text dtypes differ");
  TORCH_CHECK(scale > 0, "fastcal native: expected a positive logit scale");
  const int64_t B = image.size(0), C = text.size(0);
  TORCH_CHECK(C >= 2, "fastcal native: expected at least 2 classes");
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  if (B > 0) {  // labels index rows of G: out of range would read past them (the Python checks may be off)
    const auto range = at::aminmax(labels);
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < C,
                "fastcal native: expected labels in [0, ", C, ")");
  }
  const bool write_grad = need_image_grad || need_text_grad || need_scale_grad;

  const auto f = normalize_rows(image);
  const auto t = normalize_rows(text);
  Tensor G = gemm(f[0], t[0].t());
  auto opts = image.options();
  Tensor ce = at::empty({B}, opts), g_target = at::empty({B}, opts), g_runner = at::empty({B}, opts);
  Tensor h = write_grad ? at::empty({B}, opts) : Tensor();
  Tensor runner = at::empty({B}, labels.options());
  Tensor margins = at::empty({B}, opts), per_row = at::empty({B}, opts);
  double ce_sum = 0, margin_sum = 0, margin_var = 0;

  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "fastcal_calibrated_forward", [&] {
    using T = scalar_t;
    T* g = G.data_ptr<T>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const T s = static_cast<T>(scale);
    ce_margin_rows<T>(g, y, B, C, s, static_cast<T>(label_smoothing), write_grad, ce.data_ptr<T>(),
                      g_target.data_ptr<T>(), g_runner.data_ptr<T>(), runner.data_ptr<int64_t>(),
                      write_grad ? h.data_ptr<T>() : nullptr);
    // Second stage over the B rows: mean and variance of the margins, their share of the gradient.
    const T* lp = ce.data_ptr<T>();
    const T* gy = g_target.data_ptr<T>();
    const T* gr = g_runner.data_ptr<T>();
    const int64_t* rp = runner.data_ptr<int64_t>();
    T* mp = margins.data_ptr<T>();
    T* vp = per_row.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      mp[i] = s * gy[i] - s * gr[i];
      margin_sum += static_cast<double>(mp[i]);
      ce_sum += static_cast<double>(lp[i]);
    }
    const double mbar = margin_sum / static_cast<double>(B);
    T* hp = write_grad ? h.data_ptr<T>() : nullptr;
    for (int64_t i = 0; i < B; ++i) {
      const double dev = static_cast<double>(mp[i]) - mbar;
      margin_var += dev * dev;
      vp[i] = static_cast<T>(static_cast<double>(lp[i]) - alpha * static_cast<double>(mp[i]) + beta * dev * dev);
      if (write_grad) {
        const T a = static_cast<T>(-alpha + 2.0 * beta * dev);
        g[i * C + y[i]] += s * a;
        g[i * C + rp[i]] -= s * a;
        hp[i] += a * (gy[i] - gr[i]);
      }
    }
    margin_var /= static_cast<double>(B);
  });

  const double mbar = margin_sum / static_cast<double>(B);
  const double margin_reg = -alpha * mbar + beta * margin_var;
  Tensor moment = at::zeros({}, opts);
  Tensor t0_raw, t0_rnorm, dM_dt, dM_dt0;
  if (frozen.has_value()) {
    const Tensor t0 = frozen->to(image.scalar_type()).contiguous();
    const Tensor r0 = inverse_row_norms(t0);
    auto mt = moment_terms(t[0], t0, r0, need_text_grad, need_frozen_grad);
    if (need_frozen_grad) {  // kept for the backward only when it needs them
      t0_raw = t0;
      t0_rnorm = r0;
    }
    moment = mt[0];
    dM_dt = mt[1];
    dM_dt0 = mt[2];
  }
  Tensor loss;
  const Tensor weighted_moment = moment * moment_weight;
  if (reduction == kReductionNone) {
    loss = per_row + weighted_moment;
  } else {
    const double total = reduction == kReductionMean ? ce_sum / B + margin_reg : ce_sum + B * margin_reg;
    loss = weighted_moment * (reduction == kReductionMean ? 1.0 : static_cast<double>(B)) + total;
  }
  Tensor ce_mean = at::scalar_tensor(ce_sum / B, opts);
  Tensor margin_t = at::scalar_tensor(margin_reg, opts);
  return {loss,
          ce_mean,
          margin_t,
          moment,
          write_grad ? G : Tensor(),
          f[0],
          f[1],
          t[0],
          t[1],
          t0_raw,
          t0_rnorm,
          dM_dt,
          dM_dt0,
          labels,
          runner,
          h,
          margins};
}

// Backward. grad_out is 0-dim ("mean", "sum") or (B,) ("none"). Returns grad_image, grad_text,
// grad_frozen, grad_scale (0-dim), each undefined when not requested.
std::vector<Tensor> backward(const Tensor& grad_out, const Tensor& J, const Tensor& f_hat, const Tensor& f_rnorm,
                             const Tensor& t_hat, const Tensor& t_rnorm, const c10::optional<Tensor>& t0,
                             const c10::optional<Tensor>& t0_rnorm, const c10::optional<Tensor>& dM_dt,
                             const c10::optional<Tensor>& dM_dt0, const Tensor& labels_in, const Tensor& runner,
                             const c10::optional<Tensor>& h, const Tensor& margins, double scale, double beta,
                             double moment_weight, int64_t reduction, bool need_image_grad, bool need_text_grad,
                             bool need_frozen_grad, bool need_scale_grad) {
  const int64_t B = f_hat.size(0);
  const auto dtype = f_hat.scalar_type();
  Tensor grad_image, grad_text, grad_frozen, grad_scale;
  if (reduction != kReductionNone) {
    // Uniform row weight g; the mean(m) coupling kappa is zero.
    const double g = grad_out.item<double>() / (reduction == kReductionMean ? static_cast<double>(B) : 1.0);
    const double moment_scale = moment_weight * static_cast<double>(B);
    if (need_image_grad) grad_image = normalize_rows_backward(gemm(J, t_hat), f_hat, f_rnorm, g, true);
    if (need_text_grad) {
      const Tensor gt = dM_dt.has_value() ? gemm_add(*dM_dt, J.t(), f_hat, moment_scale, 1.0) : gemm(J.t(), f_hat);
      grad_text = normalize_rows_backward(gt, t_hat, t_rnorm, g, true);
    }
    if (need_frozen_grad && dM_dt0.has_value())
      grad_frozen = normalize_rows_backward(*dM_dt0, *t0, *t0_rnorm, g * moment_scale, false);
    if (need_scale_grad) grad_scale = h->sum() * g;
  } else {
    const Tensor g = grad_out.to(dtype).contiguous();
    const Tensor labels = labels_in.to(at::kLong);
    const Tensor dev = margins - margins.mean();
    const Tensor coupling = (g * dev).sum() * (-2.0 * beta / static_cast<double>(B));  // kappa / s
    const Tensor kappa = coupling * scale;
    const Tensor g_total = g.sum() * moment_weight;
    if (need_image_grad) {
      Tensor gf = gemm(J, t_hat).mul_(g.unsqueeze(1));
      gf.add_((t_hat.index_select(0, labels) - t_hat.index_select(0, runner)) * kappa);
      grad_image = normalize_rows_backward(gf, f_hat, f_rnorm, 1.0, true);
    }
    if (need_text_grad) {
      Tensor gt = gemm(J.t(), f_hat * g.unsqueeze(1));
      const Tensor fk = f_hat * kappa;
      gt.index_add_(0, labels, fk).index_add_(0, runner, -fk);
      if (dM_dt.has_value()) gt.add_(*dM_dt * g_total);
      grad_text = normalize_rows_backward(gt, t_hat, t_rnorm, 1.0, true);
    }
    if (need_frozen_grad && dM_dt0.has_value())
      grad_frozen = normalize_rows_backward(*dM_dt0 * g_total, *t0, *t0_rnorm, 1.0, false);
    // sum_i (G_iy - G_ir) = sum_i m_i / s
    if (need_scale_grad) grad_scale = (g * *h).sum() + coupling * margins.sum() / scale;
  }
  return {grad_image, grad_text, grad_frozen, grad_scale};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcal native CPU backend: fused calibrated prompt loss (forward and backward)";
  m.def("forward", &forward, "calibrated prompt loss, fused forward");
  m.def("backward", &backward, "calibrated prompt loss, fused backward");
}
