// C++ reference of the LoRA linear, forward and backward, in double precision, with LoRA dropout.
//
//   y  = x W0^T + b + s (d(x) A^T) B^T                     d(x) = keep * x / (1 - p)
//   dX = dY W0 + s (keep / (1 - p)) * ((dY B) A)     dA = s (dY B)^T d(x)     dB = s dY^T (d(x) A^T)
//   db = sum_rows dY
//
// keep is the Triton kernels' dropout mask (kernels/dropout.py), drawn here from (seed, p) by this
// file's own Philox (see "Dropout" below); without a seed, or at p = 0, there is no dropout.
//
// Written from the formula, sharing no code with the Triton kernels or the PyTorch paths, and not
// linked against libtorch: arrays come in through numpy's buffer protocol, so one build serves any
// torch version. Every sum accumulates in double; loops are parallel over independent outputs with
// OpenMP where the compiler has it (each output element is written by one thread: no reductions
// across threads, so results do not depend on the thread count).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

namespace {

struct Matrix {
  const double* data;
  int64_t rows, cols;
  double at(int64_t i, int64_t j) const { return data[i * cols + j]; }
};

std::string dim(int64_t n) { return n < 0 ? std::string("any") : std::to_string(n); }

// A 2-D view of `a`, checked against the expected shape (-1: any size).
Matrix view(const Array& a, const char* name, int64_t rows, int64_t cols) {
  if (a.ndim() != 2 || (rows >= 0 && a.shape(0) != rows) || (cols >= 0 && a.shape(1) != cols)) {
    std::string got = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
    throw std::invalid_argument(std::string(name) + ": expected shape (" + dim(rows) + ", " +
                                dim(cols) + "), got " + got + ")");
  }
  return Matrix{a.data(), a.shape(0), a.shape(1)};
}

// ---- Dropout: the kernels' keep-mask ---------------------------------------------------------
//
// keep(m, k) = tl.rand(seed, m*K + k) >= p, and tl.rand (triton/language/random.py) for an int64
// offset is Philox4x32-10 with counter (offset mod 2^32, offset >> 32, 0, 0) and key
// (seed mod 2^32, seed >> 32); its first output word, read as an int32 with negatives folded onto
// [0, 2^31) by ~v, is converted to float (round to nearest) and multiplied by the float nearest
// 4.6566127342e-10; p is compared as a float. The mask of rows row0.. of an (M, K) x is that of
// the contiguous offsets row0*K, row0*K + 1, ...: a flat run of counters.

constexpr uint64_t kLow32 = 0xFFFFFFFFu;
const float kUniformScale = static_cast<float>(4.6566127342e-10);   // (2^24 - 1) / 2^55, as Triton rounds it

// Philox4x32-10's first output word for counter (offset mod 2^32, offset >> 32, 0, 0). The 32-bit
// words ride in 64-bit variables, masked where they enter a product and nowhere else (their high
// halves never reach a product or the result): (a & kLow32) * b is the 32x32->64 multiply that
// the vector units have, so the loop over offsets below vectorises.
inline uint32_t philox_first_word(uint64_t offset, uint64_t seed) {
  uint64_t c0 = offset & kLow32, c1 = offset >> 32, c2 = 0, c3 = 0;
  uint64_t k0 = seed & kLow32, k1 = seed >> 32;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = (c0 & kLow32) * 0xD2511F53u, b = (c2 & kLow32) * 0xCD9E8D57u;
    c0 = (b >> 32) ^ c1 ^ k0;   // hi(B * c2) ^ c1 ^ k0
    c2 = (a >> 32) ^ c3 ^ k1;   // hi(A * c0) ^ c3 ^ k1
    c1 = b;                     // lo(B * c2)
    c3 = a;                     // lo(A * c0)
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return static_cast<uint32_t>(c0);
}

// Triton's uint_to_uniform_float: the word as int32, ~v for negatives, times the scale in float.
inline float uniform(uint32_t word) {
  const uint32_t v = (word >> 31) ? ~word : word;   // < 2^31: exact as int32
  return static_cast<float>(static_cast<int32_t>(v)) * kUniformScale;
}

// An AVX-512 build of this loop is chosen when the module loads, on CPUs that have it (function
// multi-versioning, where GCC can do it): 2.7x as fast as the x86-64 baseline build (3.6 against
// 9.8 ns per draw, one Xeon core, GCC 12). AVX2 gains nothing (10.9 ns: its 64-bit products are
// emulated), so there is no AVX2 build.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define LORA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define LORA_VECTOR_CLONES
#endif

// keep[i] = the mask at offset start + i, for i < n.
LORA_VECTOR_CLONES void keep_run(uint64_t seed, float p, uint64_t start, int64_t n, uint8_t* keep) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    keep[i] = uniform(philox_first_word(start + static_cast<uint64_t>(i), seed)) >= p;
}

// The mask of n offsets from start as T (0 or 1), in chunks over the OpenMP threads; each chunk
// is drawn into a buffer that stays in L1 and converted from there.
template <class T>
void keep_into(uint64_t seed, double p, uint64_t start, int64_t n, T* out) {
  constexpr int64_t kChunk = 4096;
  const float p32 = static_cast<float>(p);   // the kernels receive p as a float
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
  for (int64_t c = 0; c < chunks; ++c) {
    uint8_t buf[kChunk];
    const int64_t len = std::min(kChunk, n - c * kChunk);
    keep_run(seed, p32, start + static_cast<uint64_t>(c * kChunk), len, buf);
    T* dst = out + c * kChunk;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(buf[i]);
  }
}

void check_p(double p) {
  if (!(p >= 0.0 && p < 1.0))
    throw std::invalid_argument("p: expected a probability in [0, 1), got " + std::to_string(p));
}

// Writes the keep-mask of rows row0.. into `out`, a C-contiguous (M, K) array of bool, uint8,
// float32 or float64 (1 kept, 0 dropped): the caller owns the memory (a torch tensor's, through
// numpy), so nothing is copied.
void dropout_mask(py::array out, int64_t seed, double p, int64_t row0) {
  check_p(p);
  if (row0 < 0) throw std::invalid_argument("row0: expected >= 0, got " + std::to_string(row0));
  if (out.ndim() != 2 || !(out.flags() & py::array::c_style) || !out.writeable())
    throw std::invalid_argument("out: expected a writeable C-contiguous 2-D array");
  const int64_t n = out.shape(0) * out.shape(1);
  const uint64_t start = static_cast<uint64_t>(row0) * static_cast<uint64_t>(out.shape(1));
  const uint64_t key = static_cast<uint64_t>(seed);
  void* data = out.mutable_data();
  const py::dtype dtype = out.dtype();
  const bool bytes = dtype.is(py::dtype::of<bool>()) || dtype.is(py::dtype::of<uint8_t>());
  const bool f32 = dtype.is(py::dtype::of<float>()), f64 = dtype.is(py::dtype::of<double>());
  if (!bytes && !f32 && !f64)
    throw std::invalid_argument("out: expected dtype bool, uint8, float32 or float64, got " +
                                std::string(py::str(dtype)));
  py::gil_scoped_release no_gil;   // other Python threads (data loading) run meanwhile
  if (bytes)
    keep_into(key, p, start, n, static_cast<uint8_t*>(data));
  else if (f32)
    keep_into(key, p, start, n, static_cast<float*>(data));
  else
    keep_into(key, p, start, n, static_cast<double*>(data));
}

// keep / (1 - p) for the (M, K) x when the call has dropout (a seed and p > 0), else empty.
std::vector<double> dropout_scale(const std::optional<int64_t>& seed, double p, int64_t M, int64_t K) {
  check_p(p);
  if (p == 0.0) return {};
  if (!seed) throw std::invalid_argument("seed: dropout p > 0 needs a seed");
  std::vector<double> keep(M * K);
  keep_into(static_cast<uint64_t>(*seed), p, 0, M * K, keep.data());
  for (double& v : keep) v /= 1.0 - p;
  return keep;
}

// d(x) = x * scale when there is dropout (scale from dropout_scale), else x itself.
Matrix dropped(const Matrix& x, const std::vector<double>& scale, std::vector<double>& storage) {
  if (scale.empty()) return x;
  storage.resize(x.rows * x.cols);
  for (int64_t i = 0; i < x.rows * x.cols; ++i) storage[i] = x.data[i] * scale[i];
  return Matrix{storage.data(), x.rows, x.cols};
}

// xa[m, j] = sum_k x[m, k] a[j, k]
std::vector<double> x_at(const Matrix& x, const Matrix& a) {
  std::vector<double> xa(x.rows * a.rows);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < x.rows; ++m)
    for (int64_t j = 0; j < a.rows; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < x.cols; ++k) acc += x.at(m, k) * a.at(j, k);
      xa[m * a.rows + j] = acc;
    }
  return xa;
}

Array forward(const Array& x_, const Array& w_, const Array& a_, const Array& b_,
              const std::optional<Array>& bias_, double scaling, const std::optional<int64_t>& seed,
              double p) {
  Matrix w = view(w_, "weight", -1, -1);
  Matrix x = view(x_, "x", -1, w.cols);
  Matrix a = view(a_, "lora_A", -1, w.cols);
  Matrix b = view(b_, "lora_B", w.rows, a.rows);
  const double* bias = nullptr;
  if (bias_) {
    if (bias_->ndim() != 1 || bias_->shape(0) != w.rows)
      throw std::invalid_argument("bias: expected shape (" + std::to_string(w.rows) + ",)");
    bias = bias_->data();
  }
  const int64_t M = x.rows, N = w.rows, K = w.cols, R = a.rows;
  std::vector<double> storage;
  std::vector<double> xa = x_at(dropped(x, dropout_scale(seed, p, M, K), storage), a);
  Array y_({M, N});
  double* y = y_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double base = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) base += x.at(m, k) * w.at(n, k);
      double low_rank = 0.0;
      for (int64_t j = 0; j < R; ++j) low_rank += xa[m * R + j] * b.at(n, j);
      y[m * N + n] = base + scaling * low_rank;
    }
  return y_;
}

py::dict backward(const Array& dy_, const Array& x_, const Array& w_, const Array& a_,
                  const Array& b_, double scaling, bool bias_grad, const std::optional<int64_t>& seed,
                  double p) {
  Matrix w = view(w_, "weight", -1, -1);
  Matrix x = view(x_, "x", -1, w.cols);
  Matrix dy = view(dy_, "grad_out", x.rows, w.rows);
  Matrix a = view(a_, "lora_A", -1, w.cols);
  Matrix b = view(b_, "lora_B", w.rows, a.rows);
  const int64_t M = x.rows, N = w.rows, K = w.cols, R = a.rows;
  const std::vector<double> scale = dropout_scale(seed, p, M, K);   // empty: no dropout
  std::vector<double> storage;
  const Matrix xd = dropped(x, scale, storage);

  // g = dY B, (M, r)
  std::vector<double> g(M * R);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += dy.at(m, n) * b.at(n, j);
      g[m * R + j] = acc;
    }
  std::vector<double> xa = x_at(xd, a);

  Array dx_({M, K});
  double* dx = dx_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      double base = 0.0;
      for (int64_t n = 0; n < N; ++n) base += dy.at(m, n) * w.at(n, k);
      double low_rank = 0.0;
      for (int64_t j = 0; j < R; ++j) low_rank += g[m * R + j] * a.at(j, k);
      if (!scale.empty()) low_rank *= scale[m * K + k];
      dx[m * K + k] = base + scaling * low_rank;
    }

  Array da_({R, K});
  double* da = da_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += g[m * R + j] * xd.at(m, k);
      da[j * K + k] = scaling * acc;
    }

  Array db_({N, R});
  double* db = db_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += dy.at(m, n) * xa[m * R + j];
      db[n * R + j] = scaling * acc;
    }

  py::dict grads;
  grads["x"] = dx_;
  grads["lora_A"] = da_;
  grads["lora_B"] = db_;
  if (bias_grad) {
    Array dbias_({N});
    double* dbias = dbias_.mutable_data();
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += dy.at(m, n);
      dbias[n] = acc;
    }
    grads["bias"] = dbias_;
  }
  return grads;
}

// ---- 4-bit NF4 base weights (QLoRA): bitsandbytes' layout ---------------------------------------
//
// Element i of the row-major (out, in) weight is code c = the high nibble of byte i/2 for even i,
// the low one for odd i; its value is level[c] * absmax[i / 64]. With double quantisation absmax
// is itself stored as uint8 codes q into a 256-entry map: absmax[j] = map[q[j]] * scale[j / 256] +
// offset. bitsandbytes computes those products in float; they are formed in float here too (the
// stored statistics are float32), then every later sum is in double.
Array dequantize_nf4(const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& packed,
                     const py::array_t<float, py::array::c_style | py::array::forcecast>& levels,
                     const py::array_t<float, py::array::c_style | py::array::forcecast>& absmax,
                     int64_t out, int64_t in, int64_t blocksize) {
  const int64_t n = out * in;
  if (packed.size() * 2 != n) {
    throw std::invalid_argument("packed: expected " + std::to_string(n / 2) + " bytes for a (" +
                                std::to_string(out) + ", " + std::to_string(in) + ") weight, got " +
                                std::to_string(packed.size()));
  }
  if (levels.size() != 16) throw std::invalid_argument("levels: expected 16 values");
  if (blocksize <= 0 || absmax.size() != (n + blocksize - 1) / blocksize) {
    throw std::invalid_argument("absmax: expected one value per " + std::to_string(blocksize) +
                                " elements (" + std::to_string((n + blocksize - 1) / blocksize) + "), got " +
                                std::to_string(absmax.size()));
  }
  Array result({out, in});
  double* y = result.mutable_data();
  const uint8_t* bytes = packed.data();
  const float* level = levels.data();
  const float* scale = absmax.data();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = bytes[i / 2];
    const int code = (i % 2 == 0) ? (byte >> 4) : (byte & 15);
    y[i] = static_cast<double>(level[code] * scale[i / blocksize]);
  }
  return result;
}

py::array_t<float> decode_absmax(const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& codes,
                                 const py::array_t<float, py::array::c_style | py::array::forcecast>& map,
                                 const py::array_t<float, py::array::c_style | py::array::forcecast>& scales,
                                 double offset, int64_t blocksize) {
  const int64_t n = codes.size();
  if (map.size() != 256) throw std::invalid_argument("map: expected 256 values");
  if (blocksize <= 0 || scales.size() != (n + blocksize - 1) / blocksize) {
    throw std::invalid_argument("scales: expected one value per " + std::to_string(blocksize) + " codes");
  }
  py::array_t<float> result(n);
  float* out = result.mutable_data();
  const float off = static_cast<float>(offset);
  for (int64_t j = 0; j < n; ++j) out[j] = map.data()[codes.data()[j]] * scales.data()[j / blocksize] + off;
  return result;
}

// ---- DoRA (weight-decomposed LoRA, PEFT's use_dora) ------------------------------------------
//
//   n_j = ||w_j + s B_j A||  (the row of the sum itself)     c = m / n  (a constant to gradients)
//   peft form:  y = x W0^T + b + (c - 1) (d(x) W0^T) + c s (d(x) A^T) B^T
//   lora form:  y = c (x W0^T + s (d(x) A^T) B^T) + b
//   e = dY c;  dA = s (e B)^T d(x);  dB = s e^T (d(x) A^T);  dm_j = sum_m dY_mj side_mj / n_j
//   with side = d(x) W0^T + s (d(x) A^T) B^T (peft) or x W0^T + s (d(x) A^T) B^T (lora), and
//   dX = dY W0 + keep/(1-p) ((c - 1) dY W0 + s (e B) A) (peft) or e W0 + keep/(1-p) s (e B) A (lora).

std::vector<double> dora_norms(const Matrix& w, const Matrix& a, const Matrix& b, double scaling) {
  std::vector<double> norm(w.rows);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < w.rows; ++n) {
    double acc = 0.0;
    for (int64_t k = 0; k < w.cols; ++k) {
      double v = w.at(n, k);
      for (int64_t j = 0; j < a.rows; ++j) v += scaling * b.at(n, j) * a.at(j, k);
      acc += v * v;
    }
    norm[n] = std::sqrt(acc);
  }
  return norm;
}

struct DoraParts {
  std::vector<double> norm, c, base, based, low;   // (N), (N), (M, N) x W0^T, d(x) W0^T, s xa B^T
  std::vector<double> scale, storage, xa;
  int64_t M, N, K, R;
};

DoraParts dora_parts(const Matrix& x, const Matrix& w, const Matrix& a, const Matrix& b, const Array& m_,
                     double scaling, const std::optional<int64_t>& seed, double p) {
  DoraParts d;
  d.M = x.rows, d.N = w.rows, d.K = w.cols, d.R = a.rows;
  if (m_.ndim() != 1 || m_.shape(0) != d.N)
    throw std::invalid_argument("magnitude: expected shape (" + std::to_string(d.N) + ",)");
  d.norm = dora_norms(w, a, b, scaling);
  d.c.resize(d.N);
  for (int64_t n = 0; n < d.N; ++n) d.c[n] = m_.data()[n] / d.norm[n];
  d.scale = dropout_scale(seed, p, d.M, d.K);
  const Matrix xd = dropped(x, d.scale, d.storage);
  d.xa = x_at(xd, a);
  d.base.resize(d.M * d.N), d.based.resize(d.M * d.N), d.low.resize(d.M * d.N);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < d.M; ++i)
    for (int64_t n = 0; n < d.N; ++n) {
      double base = 0.0, based = 0.0, low = 0.0;
      for (int64_t k = 0; k < d.K; ++k) {
        base += x.at(i, k) * w.at(n, k);
        based += xd.at(i, k) * w.at(n, k);
      }
      for (int64_t j = 0; j < d.R; ++j) low += d.xa[i * d.R + j] * b.at(n, j);
      d.base[i * d.N + n] = base, d.based[i * d.N + n] = based, d.low[i * d.N + n] = scaling * low;
    }
  return d;
}

Array dora_forward(const Array& x_, const Array& w_, const Array& a_, const Array& b_, const Array& m_,
                   const std::optional<Array>& bias_, double scaling, const std::optional<int64_t>& seed,
                   double p, bool peft_form) {
  Matrix w = view(w_, "weight", -1, -1);
  Matrix x = view(x_, "x", -1, w.cols);
  Matrix a = view(a_, "lora_A", -1, w.cols);
  Matrix b = view(b_, "lora_B", w.rows, a.rows);
  if (bias_ && (bias_->ndim() != 1 || bias_->shape(0) != w.rows))
    throw std::invalid_argument("bias: expected shape (" + std::to_string(w.rows) + ",)");
  DoraParts d = dora_parts(x, w, a, b, m_, scaling, seed, p);
  Array y_({d.M, d.N});
  double* y = y_.mutable_data();
  for (int64_t i = 0; i < d.M; ++i)
    for (int64_t n = 0; n < d.N; ++n) {
      const int64_t at = i * d.N + n;
      double v = peft_form ? d.base[at] + (d.c[n] - 1.0) * d.based[at] + d.c[n] * d.low[at]
                           : d.c[n] * (d.base[at] + d.low[at]);
      y[at] = v + (bias_ ? bias_->data()[n] : 0.0);
    }
  return y_;
}

py::dict dora_backward(const Array& dy_, const Array& x_, const Array& w_, const Array& a_, const Array& b_,
                       const Array& m_, double scaling, const std::optional<int64_t>& seed, double p,
                       bool peft_form) {
  Matrix w = view(w_, "weight", -1, -1);
  Matrix x = view(x_, "x", -1, w.cols);
  Matrix dy = view(dy_, "grad_out", x.rows, w.rows);
  Matrix a = view(a_, "lora_A", -1, w.cols);
  Matrix b = view(b_, "lora_B", w.rows, a.rows);
  DoraParts d = dora_parts(x, w, a, b, m_, scaling, seed, p);
  const int64_t M = d.M, N = d.N, K = d.K, R = d.R;
  std::vector<double> storage;
  const Matrix xd = dropped(x, d.scale, storage);
  std::vector<double> g(M * R);   // (e B), e = dY c
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += dy.at(i, n) * d.c[n] * b.at(n, j);
      g[i * R + j] = acc;
    }
  Array dx_({M, K});
  double* dx = dx_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) {
      double full = 0.0, masked = 0.0;   // the terms on x, and those on d(x) (before its scale)
      for (int64_t n = 0; n < N; ++n) {
        if (peft_form) {
          full += dy.at(i, n) * w.at(n, k);
          masked += (d.c[n] - 1.0) * dy.at(i, n) * w.at(n, k);
        } else {
          full += d.c[n] * dy.at(i, n) * w.at(n, k);
        }
      }
      for (int64_t j = 0; j < R; ++j) masked += scaling * g[i * R + j] * a.at(j, k);
      dx[i * K + k] = full + (d.scale.empty() ? masked : masked * d.scale[i * K + k]);
    }
  Array da_({R, K});
  double* da = da_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t i = 0; i < M; ++i) acc += g[i * R + j] * xd.at(i, k);
      da[j * K + k] = scaling * acc;
    }
  Array db_({N, R});
  double* db = db_.mutable_data();
  Array dm_({N});
  double* dm = dm_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t i = 0; i < M; ++i) acc += dy.at(i, n) * d.c[n] * d.xa[i * R + j];
      db[n * R + j] = scaling * acc;
    }
    double acc = 0.0;
    for (int64_t i = 0; i < M; ++i) {
      const int64_t at = i * N + n;
      acc += dy.at(i, n) * ((peft_form ? d.based[at] : d.base[at]) + d.low[at]);
    }
    dm[n] = acc / d.norm[n];
  }
  py::dict grads;
  grads["x"] = dx_;
  grads["lora_A"] = da_;
  grads["lora_B"] = db_;
  grads["magnitude"] = dm_;
  return grads;
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_cref, m) {
  m.doc() = "Double-precision C++ reference of the LoRA linear (forward and backward, LoRA dropout).";
  m.def("forward", &forward, py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("bias") = std::nullopt, py::arg("scaling") = 1.0, py::arg("seed") = std::nullopt,
        py::arg("p") = 0.0,
        "y = x W0^T + b + s (d(x) A^T) B^T for 2-D float64 arrays, d the kernels' dropout of (seed, p)\n"
        "(none at p = 0); returns y (M, N).");
  m.def("backward", &backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("scaling") = 1.0, py::arg("bias_grad") = false,
        py::arg("seed") = std::nullopt, py::arg("p") = 0.0,
        "Gradients with W0 frozen, with the forward's (seed, p): dict with 'x', 'lora_A', 'lora_B' and,\n"
        "if bias_grad, 'bias'.");
  m.def("dropout_mask", &dropout_mask, py::arg("out"), py::arg("seed"), py::arg("p"), py::arg("row0") = 0,
        "Writes the kernels' keep-mask of rows row0.. (1 kept, 0 dropped) into out, a C-contiguous\n"
        "(M, K) array of bool, uint8, float32 or float64.");
  m.def("dequantize_nf4", &dequantize_nf4, py::arg("packed"), py::arg("levels"), py::arg("absmax"),
        py::arg("out"), py::arg("in"), py::arg("blocksize") = 64,
        "The (out, in) float64 weight of NF4 codes (two per byte, the first in the high nibble), the 16\n"
        "levels and one float32 absmax per blocksize elements.");
  m.def("decode_absmax", &decode_absmax, py::arg("codes"), py::arg("map"), py::arg("scales"),
        py::arg("offset"), py::arg("blocksize") = 256,
        "Double quantisation's absmax in float32: map[codes[j]] * scales[j / blocksize] + offset.");
  m.def("dora_forward", &dora_forward, py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("magnitude"), py::arg("bias") = std::nullopt, py::arg("scaling") = 1.0,
        py::arg("seed") = std::nullopt, py::arg("p") = 0.0, py::arg("peft_form") = true,
        "DoRA's y (M, N): c = m / ||W0 + s B A||_row; peft_form: x W0^T + b + (c - 1) d(x) W0^T +\n"
        "c s d(x) A^T B^T, else c (x W0^T + s d(x) A^T B^T) + b.");
  m.def("dora_backward", &dora_backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("magnitude"), py::arg("scaling") = 1.0,
        py::arg("seed") = std::nullopt, py::arg("p") = 0.0, py::arg("peft_form") = true,
        "DoRA's gradients (the norm a constant): dict with 'x', 'lora_A', 'lora_B', 'magnitude'.");
  m.def("has_openmp", &has_openmp, "Whether this build runs its loops on OpenMP threads.");
}
