// Sums over one row of cosines g (length n) of e_c = exp(s (g_c - g_max)), e_c g_c and g_c, optionally
// writing e_c over g_c: the exponential pass of the softmax. float runs through ATen's Vectorized<float>
// (SLEEF's exp, 1 ulp) at the vector width this build was compiled for; double, and the last n mod width
// entries, through std::exp. Terms with s (g_c - g_max) < -80 are set to 0: they are below 2e-35 of the
// largest term (which is 1), and keeping them would only breed subnormal products, which are slow.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

namespace fastcal {

constexpr double kExpCutoff = -80.0;

template <typename T>
struct ExpSums {
  T e = 0, eg = 0, g = 0;
};

template <typename T>
inline void exp_sums_tail(T* g, int64_t begin, int64_t n, T s, T g_max, bool write, ExpSums<T>& out) {
  for (int64_t c = begin; c < n; ++c) {
    const T v = g[c];
    const T x = s * (v - g_max);
    const T e = x < static_cast<T>(kExpCutoff) ? T(0) : std::exp(x);
    out.e += e;
    out.eg += e * v;
    out.g += v;
    if (write) g[c] = e;
  }
}

template <typename T>
inline ExpSums<T> exp_sums(T* g, int64_t n, T s, T g_max, bool write) {
  ExpSums<T> out;
  exp_sums_tail(g, 0, n, s, g_max, write, out);
  return out;
}

template <>
inline ExpSums<float> exp_sums<float>(float* g, int64_t n, float s, float g_max, bool write) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t width = Vec::size();
  const Vec vs(s), vmax(g_max), cutoff(static_cast<float>(kExpCutoff)), zero(0.0f);
  Vec acc_e(0.0f), acc_eg(0.0f), acc_g(0.0f);
  int64_t c = 0;
  for (; c + width <= n; c += width) {
    const Vec v = Vec::loadu(g + c);
    const Vec x = (v - vmax) * vs;
    const Vec e = Vec::blendv(x.exp(), zero, x < cutoff);
    acc_e = acc_e + e;
    acc_eg = at::vec::fmadd(e, v, acc_eg);
    acc_g = acc_g + v;
    if (write) e.store(g + c);
  }
  float lanes_e[width], lanes_eg[width], lanes_g[width];
  acc_e.store(lanes_e);
  acc_eg.store(lanes_eg);
  acc_g.store(lanes_g);
  ExpSums<float> out;
  for (int64_t l = 0; l < width; ++l) {
    out.e += lanes_e[l];
    out.eg += lanes_eg[l];
    out.g += lanes_g[l];
  }
  exp_sums_tail(g, c, n, s, g_max, write, out);
  return out;
}

}  // namespace fastcal
