// Torch binding of the CUDA RMSNorm (csrc/rms_norm_cuda.cu): checks inputs, allocates outputs with
// the caching allocator and launches on the current stream. The autograd wrapper is
// kernels/rms_norm_cuda.py; this file holds no math.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <vector>

// Launchers defined in rms_norm_cuda.cu (C++ linkage: a signature that drifts fails at link time).
namespace megamath_rms {
int64_t rms_norm_backward_num_partials(int x_dtype, int w_dtype, int64_t rows, int64_t cols, int sm_count);
cudaError_t rms_norm_forward(int x_dtype, int w_dtype, const void* x, const void* w, void* y, float* rstd,
                             int64_t rows, int64_t cols, float eps, cudaStream_t stream);
cudaError_t rms_norm_backward(int x_dtype, int w_dtype, const void* dy, const void* x, const void* w,
                              const float* rstd, void* dx, void* dw, float* dw_partial, int num_partials,
                              int64_t rows, int64_t cols, cudaStream_t stream);
}  // namespace megamath_rms

namespace {

// Matches the DType enum of rms_norm_cuda.cu.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK(false, "rms_norm_cuda: dtype must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

void check_operand(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "rms_norm_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), "rms_norm_cuda: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "rms_norm_cuda: ", name, " must be contiguous");
}

// x viewed as (rows, cols) with cols = weight's length.
std::pair<int64_t, int64_t> rows_cols(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm_cuda: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 1, "rms_norm_cuda: weight must be 1-D, got shape ", weight.sizes());
  const int64_t cols = x.size(-1);
  TORCH_CHECK(cols == weight.size(0), "rms_norm_cuda: x's last dimension (", cols, ") must equal weight's length (",
              weight.size(0), ")");
  TORCH_CHECK(cols > 0, "rms_norm_cuda: the normalized dimension must not be empty");
  TORCH_CHECK(cols <= std::numeric_limits<int32_t>::max(), "rms_norm_cuda: rows wider than 2^31-1 are not supported");
  const int64_t rows = x.numel() / cols;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "rms_norm_cuda: more than 2^31-1 rows are not supported");
  dtype_code(x.scalar_type());  // checks x's dtype first, for a clear message
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "rms_norm_cuda: weight's dtype must be x's (", x.scalar_type(), ") or float32, got ",
              weight.scalar_type());
  return {rows, cols};
}

// Returns (y, rstd): y like x, rstd (rows,) fp32 for the backward.
std::vector<torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_operand(x, "x", x);
  check_operand(weight, "weight", x);
  const auto [rows, cols] = rows_cols(x, weight);
  const int x_code = dtype_code(x.scalar_type()), w_code = dtype_code(weight.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({rows}, x.options().dtype(at::kFloat));
  const cudaError_t err =
      megamath_rms::rms_norm_forward(x_code, w_code, x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                     rstd.data_ptr<float>(), rows, cols, static_cast<float>(eps),
                                     c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "rms_norm_cuda forward: launch failed: ", cudaGetErrorString(err));
  return {y, rstd};
}

// Returns (dx, dweight) from dy, the saved x, weight and rstd.
std::vector<torch::Tensor> backward(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
                                    const torch::Tensor& rstd) {
  check_operand(x, "x", x);
  check_operand(dy, "dy", x);
  check_operand(weight, "weight", x);
  check_operand(rstd, "rstd", x);
  const auto [rows, cols] = rows_cols(x, weight);
  TORCH_CHECK(dy.sizes() == x.sizes(), "rms_norm_cuda: dy has shape ", dy.sizes(), " but x has ", x.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "rms_norm_cuda: dy must have x's dtype ", x.scalar_type(),
              ", got ", dy.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows,
              "rms_norm_cuda: rstd must be float32 with one value per row");
  const int x_code = dtype_code(x.scalar_type()), w_code = dtype_code(weight.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  int sm_count = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device());
  TORCH_CHECK(err == cudaSuccess, "rms_norm_cuda backward: cannot read the SM count: ", cudaGetErrorString(err));
  const int64_t num_partials =
      megamath_rms::rms_norm_backward_num_partials(x_code, w_code, rows, cols, sm_count);
  auto dx = torch::empty_like(x);
  auto dw = torch::empty_like(weight);  // in weight's dtype
  auto dw_partial = torch::empty({num_partials, cols}, x.options().dtype(at::kFloat));  // (num_partials, cols)
  err = megamath_rms::rms_norm_backward(
      x_code, w_code, dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr<float>(), dx.data_ptr(),
      dw.data_ptr(), dw_partial.data_ptr<float>(), static_cast<int>(num_partials), rows, cols,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "rms_norm_cuda backward: launch failed: ", cudaGetErrorString(err));
  return {dx, dw};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ RMSNorm (forward and backward) for megamath.kernels.rms_norm_cuda";
  m.def("forward", &forward, "RMSNorm forward: returns (y, rstd)", pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("eps"));
  m.def("backward", &backward, "RMSNorm backward: returns (dx, dweight)", pybind11::arg("dy"), pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("rstd"));
}
