// C++ reference of the LoRA linear, forward and backward, in double precision.
//
//   y  = x W0^T + b + s (x A^T) B^T
//   dX = dY W0 + s (dY B) A      dA = s (dY B)^T x      dB = s dY^T (x A^T)      db = sum_rows dY
//
// Written from the formula, sharing no code with the Triton kernels or the PyTorch paths, and not
// linked against libtorch: arrays come in through numpy's buffer protocol, so one build serves any
// torch version. Every sum accumulates in double; loops are parallel over independent outputs with
// OpenMP where the compiler has it (each output element is written by one thread: no reductions
// across threads, so results do not depend on the thread count).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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
              const std::optional<Array>& bias_, double scaling) {
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
  std::vector<double> xa = x_at(x, a);
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
                  const Array& b_, double scaling, bool bias_grad) {
  Matrix w = view(w_, "weight", -1, -1);
  Matrix x = view(x_, "x", -1, w.cols);
  Matrix dy = view(dy_, "grad_out", x.rows, w.rows);
  Matrix a = view(a_, "lora_A", -1, w.cols);
  Matrix b = view(b_, "lora_B", w.rows, a.rows);
  const int64_t M = x.rows, N = w.rows, K = w.cols, R = a.rows;

  // g = dY B, (M, r)
  std::vector<double> g(M * R);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += dy.at(m, n) * b.at(n, j);
      g[m * R + j] = acc;
    }
  std::vector<double> xa = x_at(x, a);

  Array dx_({M, K});
  double* dx = dx_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      double base = 0.0;
      for (int64_t n = 0; n < N; ++n) base += dy.at(m, n) * w.at(n, k);
      double low_rank = 0.0;
      for (int64_t j = 0; j < R; ++j) low_rank += g[m * R + j] * a.at(j, k);
      dx[m * K + k] = base + scaling * low_rank;
    }

  Array da_({R, K});
  double* da = da_.mutable_data();
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += g[m * R + j] * x.at(m, k);
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

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_cref, m) {
  m.doc() = "Double-precision C++ reference of the LoRA linear (forward and backward).";
  m.def("forward", &forward, py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("bias") = std::nullopt, py::arg("scaling") = 1.0,
        "y = x W0^T + b + s (x A^T) B^T for 2-D float64 arrays; returns y (M, N).");
  m.def("backward", &backward, py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("scaling") = 1.0, py::arg("bias_grad") = false,
        "Gradients with W0 frozen: dict with 'x', 'lora_A', 'lora_B' and, if bias_grad, 'bias'.");
  m.def("has_openmp", &has_openmp, "Whether this build runs its loops on OpenMP threads.");
}
