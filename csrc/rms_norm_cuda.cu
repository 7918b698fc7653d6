// RMSNorm in CUDA C++: a hand-written second backend beside the Triton kernel (kernels/rms_norm.py).
//
// Why a second backend: it is the baseline that tells whether the Triton kernel leaves bandwidth on
// the table, and it is what the benchmark compares against when Liger or apex are absent.
//
// Semantics (same as rms_norm_ref in kernels/rms_norm.py, the Llama convention):
//     rstd = rsqrt(mean(x.float()^2, -1) + eps)              statistics in fp32
//     y    = (x.float() * rstd).to(T) * weight                rounded to T, then scaled by weight
// Backward, with x_hat = x * rstd and g = dy * weight (both fp32):
//     dx = rstd * (g - x_hat * mean(g * x_hat, -1))
//     dw = sum over rows of dy * x_hat.to(T)                  fp32 partials per block, reduced after
//
// Layout: x, y, dy, dx are (rows, cols) row-major; weight and dw are (cols,). One block per row in the
// forward; a persistent grid of `num_partials` blocks striding over rows in the backward, each block
// owning one fp32 row of dw_partial (num_partials, cols), so no atomics are needed.
//
// Two code paths per kernel:
//   * cached: the row lives in registers (VPT vectors of VEC elements per thread), so x is read from
//     device memory exactly once; used when the row fits (up to 4096 vectors, e.g. 32768 bf16 cols).
//   * loop: any width; the row is re-read in a second pass (from L1/L2 in practice).
// Vectors are 16 bytes wide when cols is a multiple of 16 / sizeof(T) and every pointer is 16-byte
// aligned; otherwise VEC = 1.
//
// No torch headers here: this file compiles with a bare `nvcc -c`; csrc/rms_norm_binding.cpp is the
// torch side and declares the launchers below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace megamath_rms {

// ---------------------------------------------------------------------------------------------------
// Element conversions and a 16-byte vector.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Rounds through T: the reference rounds the normalized value to x.dtype before scaling by weight.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ---------------------------------------------------------------------------------------------------
// Reductions: warp shuffles, then one value per warp through shared memory.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. Safe to call repeatedly in a loop: the barrier after
// the broadcast read of the previous call precedes any write of the next.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_totals[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) >> 5;
    v = lane < n_warps ? warp_totals[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------------
// Forward.

template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(1024) fwd_cached_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                          T* __restrict__ y, float* __restrict__ rstd,
                                                          int64_t cols, float eps) {
  using V = Vec<T, VEC>;
  using WV = Vec<W, VEC>;
  const int64_t row = blockIdx.x;
  const int n_vec = static_cast<int>(cols / VEC);
  const V* x_row = reinterpret_cast<const V*>(x + row * cols);  // (cols / VEC,)
  V* y_row = reinterpret_cast<V*>(y + row * cols);
  const WV* w_vec = reinterpret_cast<const WV*>(w);

  V xv[VPT];  // this thread's slice of the row, read once
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < n_vec) {
      xv[i] = x_row[idx];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(xv[i].v[j]);
        sum_sq += f * f;
      }
    }
  }
  const float r = rsqrtf(block_sum(sum_sq) / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < n_vec) {
      const WV wv = w_vec[idx];
      V out;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out.v[j] = from_float<T>(round_to<T>(to_float(xv[i].v[j]) * r) * to_float(wv.v[j]));
      y_row[idx] = out;
    }
  }
}

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(1024) fwd_loop_kernel(const T* __restrict__ x, const W* __restrict__ w,
                                                        T* __restrict__ y, float* __restrict__ rstd,
                                                        int64_t cols, float eps) {
  using V = Vec<T, VEC>;
  using WV = Vec<W, VEC>;
  const int64_t row = blockIdx.x;
  const int64_t n_vec = cols / VEC;
  const V* x_row = reinterpret_cast<const V*>(x + row * cols);
  V* y_row = reinterpret_cast<V*>(y + row * cols);
  const WV* w_vec = reinterpret_cast<const WV*>(w);

  float sum_sq = 0.f;
  for (int64_t idx = threadIdx.x; idx < n_vec; idx += blockDim.x) {
    const V xv = x_row[idx];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(xv.v[j]);
      sum_sq += f * f;
    }
  }
  const float r = rsqrtf(block_sum(sum_sq) / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t idx = threadIdx.x; idx < n_vec; idx += blockDim.x) {
    const V xv = x_row[idx];  // second read, served by L1/L2
    const WV wv = w_vec[idx];
    V out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      out.v[j] = from_float<T>(round_to<T>(to_float(xv.v[j]) * r) * to_float(wv.v[j]));
    y_row[idx] = out;
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward: dx per row, dw as fp32 partial rows (one per block), then a column reduction.

template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(1024) bwd_cached_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                          const W* __restrict__ w, const float* __restrict__ rstd,
                                                          T* __restrict__ dx, float* __restrict__ dw_partial,
                                                          int64_t rows, int64_t cols) {
  using V = Vec<T, VEC>;
  using WV = Vec<W, VEC>;
  const int n_vec = static_cast<int>(cols / VEC);
  const WV* w_vec = reinterpret_cast<const WV*>(w);
  float dw_acc[VPT][VEC];  // this thread's columns of sum(dy * x_hat)
#pragma unroll
  for (int i = 0; i < VPT; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw_acc[i][j] = 0.f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const V* x_row = reinterpret_cast<const V*>(x + row * cols);
    const V* dy_row = reinterpret_cast<const V*>(dy + row * cols);
    V* dx_row = reinterpret_cast<V*>(dx + row * cols);
    const float r = rstd[row];
    V xv[VPT], dyv[VPT];
    float dot = 0.f;  // sum(g * x_hat) over this thread's columns
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < n_vec) {
        xv[i] = x_row[idx];
        dyv[i] = dy_row[idx];
        const WV wv = w_vec[idx];
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot += to_float(dyv[i].v[j]) * to_float(wv.v[j]) * to_float(xv[i].v[j]);
      }
    }
    const float mean_dot = block_sum(dot) * r / static_cast<float>(cols);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < n_vec) {
        const WV wv = w_vec[idx];
        V out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float x_hat = to_float(xv[i].v[j]) * r;
          const float d = to_float(dyv[i].v[j]);
          out.v[j] = from_float<T>(r * (d * to_float(wv.v[j]) - x_hat * mean_dot));
          dw_acc[i][j] += d * round_to<T>(x_hat);
        }
        dx_row[idx] = out;
      }
    }
  }
  float* partial_row = dw_partial + static_cast<int64_t>(blockIdx.x) * cols;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < n_vec) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) partial_row[static_cast<int64_t>(idx) * VEC + j] = dw_acc[i][j];
    }
  }
}

template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(1024) bwd_loop_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                                        const W* __restrict__ w, const float* __restrict__ rstd,
                                                        T* __restrict__ dx, float* __restrict__ dw_partial,
                                                        int64_t rows, int64_t cols) {
  using V = Vec<T, VEC>;
  using WV = Vec<W, VEC>;
  const int64_t n_vec = cols / VEC;
  const WV* w_vec = reinterpret_cast<const WV*>(w);
  // This block owns one partial row; within a row pass each thread touches only its own columns.
  float* partial_row = dw_partial + static_cast<int64_t>(blockIdx.x) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) partial_row[c] = 0.f;
  // The zeroing above strides by element, the accumulation below by vector: different threads.
  __syncthreads();

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const V* x_row = reinterpret_cast<const V*>(x + row * cols);
    const V* dy_row = reinterpret_cast<const V*>(dy + row * cols);
    V* dx_row = reinterpret_cast<V*>(dx + row * cols);
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t idx = threadIdx.x; idx < n_vec; idx += blockDim.x) {
      const V xv = x_row[idx], dyv = dy_row[idx];
      const WV wv = w_vec[idx];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dot += to_float(dyv.v[j]) * to_float(wv.v[j]) * to_float(xv.v[j]);
    }
    const float mean_dot = block_sum(dot) * r / static_cast<float>(cols);
    for (int64_t idx = threadIdx.x; idx < n_vec; idx += blockDim.x) {
      const V xv = x_row[idx], dyv = dy_row[idx];
      const WV wv = w_vec[idx];
      V out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float x_hat = to_float(xv.v[j]) * r;
        const float d = to_float(dyv.v[j]);
        out.v[j] = from_float<T>(r * (d * to_float(wv.v[j]) - x_hat * mean_dot));
        partial_row[idx * VEC + j] += d * round_to<T>(x_hat);
      }
      dx_row[idx] = out;
    }
  }
}

// dw[c] = sum_p dw_partial[p, c]: a (32 columns) x (16 partial rows) tile per block, coalesced along c.
template <typename T>
__global__ void dw_reduce_kernel(const float* __restrict__ dw_partial, T* __restrict__ dw, int num_partials,
                                 int64_t cols) {
  __shared__ float tile[16][33];  // padded against bank conflicts
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < cols)
    for (int p = threadIdx.y; p < num_partials; p += 16) acc += dw_partial[static_cast<int64_t>(p) * cols + c];
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < 16; ++k) total += tile[k][threadIdx.x];
    dw[c] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side: pick the vector width, the threads per block and the cached/loop path, then dispatch on
// (x dtype, weight dtype): weight is either x's dtype or fp32 (fp32 master weights under autocast).

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

namespace {

constexpr int kMaxCachedVecsFwd = 4;  // vectors per thread kept in registers (forward)
constexpr int kMaxCachedVecsBwd = 2;  // backward keeps x, dy and fp32 dw sums: fewer fit

bool aligned(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

int round_up_32(int64_t n) { return static_cast<int>(((n + 31) / 32) * 32); }

struct Plan {
  int vec;      // elements per vector (16 bytes of x, or 1)
  int vpt;      // vectors per thread on the cached path; 0 selects the loop path
  int threads;  // per block
};

Plan make_plan(int64_t cols, int vec, int max_cached) {
  Plan p;
  p.vec = vec;
  const int64_t n_vec = cols / vec;
  p.vpt = 0;
  for (int vpt = 1; vpt <= max_cached; vpt *= 2) {
    if (n_vec <= 1024LL * vpt) {
      p.vpt = vpt;
      break;
    }
  }
  const int64_t per_thread = p.vpt ? p.vpt : 1;
  const int64_t want = (n_vec + per_thread - 1) / per_thread;
  p.threads = want >= 1024 ? 1024 : round_up_32(want);
  return p;
}

// 16-byte vectors of T when cols divides into them and every row pointer is aligned for them.
template <typename T, typename W>
int pick_vec(int64_t cols, bool activations_aligned16, const void* w) {
  constexpr int full = 16 / sizeof(T);
  return (cols % full == 0 && activations_aligned16 && aligned(w, full * sizeof(W))) ? full : 1;
}

template <typename T, typename W, int VEC>
void launch_fwd(const Plan& p, const T* x, const W* w, T* y, float* rstd, int64_t rows, int64_t cols, float eps,
                cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(rows));
  switch (p.vpt) {
    case 1: fwd_cached_kernel<T, W, VEC, 1><<<grid, p.threads, 0, s>>>(x, w, y, rstd, cols, eps); break;
    case 2: fwd_cached_kernel<T, W, VEC, 2><<<grid, p.threads, 0, s>>>(x, w, y, rstd, cols, eps); break;
    case 4: fwd_cached_kernel<T, W, VEC, 4><<<grid, p.threads, 0, s>>>(x, w, y, rstd, cols, eps); break;
    default: fwd_loop_kernel<T, W, VEC><<<grid, p.threads, 0, s>>>(x, w, y, rstd, cols, eps); break;
  }
}

template <typename T, typename W, int VEC>
void launch_bwd(const Plan& p, const T* dy, const T* x, const W* w, const float* rstd, T* dx, float* dw_partial,
                int num_partials, int64_t rows, int64_t cols, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(num_partials));
  switch (p.vpt) {
    case 1: bwd_cached_kernel<T, W, VEC, 1><<<grid, p.threads, 0, s>>>(dy, x, w, rstd, dx, dw_partial, rows, cols); break;
    case 2: bwd_cached_kernel<T, W, VEC, 2><<<grid, p.threads, 0, s>>>(dy, x, w, rstd, dx, dw_partial, rows, cols); break;
    default: bwd_loop_kernel<T, W, VEC><<<grid, p.threads, 0, s>>>(dy, x, w, rstd, dx, dw_partial, rows, cols); break;
  }
}

struct FwdArgs {
  const void* x; const void* w; void* y; float* rstd; int64_t rows; int64_t cols; float eps; cudaStream_t s;
};

struct BwdArgs {
  const void* dy; const void* x; const void* w; const float* rstd; void* dx; void* dw; float* dw_partial;
  int num_partials; int64_t rows; int64_t cols; cudaStream_t s;
};

template <typename T, typename W>
cudaError_t forward_typed(const FwdArgs& a) {
  const int vec = pick_vec<T, W>(a.cols, aligned(a.x, 16) && aligned(a.y, 16), a.w);
  const Plan p = make_plan(a.cols, vec, kMaxCachedVecsFwd);
  const T* x = static_cast<const T*>(a.x);
  const W* w = static_cast<const W*>(a.w);
  T* y = static_cast<T*>(a.y);
  if (p.vec == 1)
    launch_fwd<T, W, 1>(p, x, w, y, a.rstd, a.rows, a.cols, a.eps, a.s);
  else
    launch_fwd<T, W, 16 / sizeof(T)>(p, x, w, y, a.rstd, a.rows, a.cols, a.eps, a.s);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t backward_typed(const BwdArgs& a) {
  const int vec = pick_vec<T, W>(a.cols, aligned(a.dy, 16) && aligned(a.x, 16) && aligned(a.dx, 16), a.w);
  const Plan p = make_plan(a.cols, vec, kMaxCachedVecsBwd);
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  const W* w = static_cast<const W*>(a.w);
  T* dx = static_cast<T*>(a.dx);
  if (p.vec == 1)
    launch_bwd<T, W, 1>(p, dy, x, w, a.rstd, dx, a.dw_partial, a.num_partials, a.rows, a.cols, a.s);
  else
    launch_bwd<T, W, 16 / sizeof(T)>(p, dy, x, w, a.rstd, dx, a.dw_partial, a.num_partials, a.rows, a.cols, a.s);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 block(32, 16);
  const dim3 grid(static_cast<unsigned>((a.cols + 31) / 32));
  dw_reduce_kernel<W><<<grid, block, 0, a.s>>>(a.dw_partial, static_cast<W*>(a.dw), a.num_partials, a.cols);
  return cudaGetLastError();
}

// Resident blocks per SM of the backward kernel that `p` selects (the persistent grid's depth).
template <typename T, typename W, int VEC>
int bwd_blocks_per_sm(const Plan& p) {
  int blocks = 0;
  cudaError_t err;
  switch (p.vpt) {
    case 1:
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, bwd_cached_kernel<T, W, VEC, 1>, p.threads, 0);
      break;
    case 2:
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, bwd_cached_kernel<T, W, VEC, 2>, p.threads, 0);
      break;
    default:
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, bwd_loop_kernel<T, W, VEC>, p.threads, 0);
      break;
  }
  return (err == cudaSuccess && blocks > 0) ? blocks : 1;
}

template <typename T, typename W>
int bwd_blocks_per_sm_typed(int64_t cols) {
  const Plan p = make_plan(cols, cols % (16 / sizeof(T)) == 0 ? 16 / sizeof(T) : 1, kMaxCachedVecsBwd);
  return p.vec == 1 ? bwd_blocks_per_sm<T, W, 1>(p) : bwd_blocks_per_sm<T, W, 16 / sizeof(T)>(p);
}

// Calls F<T, W>::run(args) for the supported pairs: W == T, or W == float.
template <template <typename, typename> class F, typename Args>
cudaError_t dispatch(int x_dtype, int w_dtype, const Args& args) {
  const bool same = x_dtype == w_dtype;
  if (!same && w_dtype != kFloat32) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case kFloat32: return F<float, float>::run(args);
    case kFloat16: return same ? F<__half, __half>::run(args) : F<__half, float>::run(args);
    case kBFloat16: return same ? F<__nv_bfloat16, __nv_bfloat16>::run(args) : F<__nv_bfloat16, float>::run(args);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename W> struct Forward {
  static cudaError_t run(const FwdArgs& a) { return forward_typed<T, W>(a); }
};
template <typename T, typename W> struct Backward {
  static cudaError_t run(const BwdArgs& a) { return backward_typed<T, W>(a); }
};
template <typename T, typename W> struct Occupancy {
  static cudaError_t run(const std::pair<int64_t, int*>& a) {
    *a.second = bwd_blocks_per_sm_typed<T, W>(a.first);
    return cudaSuccess;
  }
};

}  // namespace

// Rows of dw_partial the backward needs: one wave of resident blocks over every SM, never more than
// rows (each block then owns at least one row).
int64_t rms_norm_backward_num_partials(int x_dtype, int w_dtype, int64_t rows, int64_t cols, int sm_count) {
  int per_sm = 1;
  dispatch<Occupancy>(x_dtype, w_dtype, std::pair<int64_t, int*>(cols, &per_sm));
  const int64_t want = static_cast<int64_t>(sm_count) * per_sm;
  return rows < want ? rows : want;
}

// y = rms_norm(x) * w for (rows, cols) x; writes rstd (rows,) in fp32 for the backward.
// Returns cudaErrorInvalidValue for an unsupported dtype pair.
cudaError_t rms_norm_forward(int x_dtype, int w_dtype, const void* x, const void* w, void* y, float* rstd,
                             int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch<Forward>(x_dtype, w_dtype, FwdArgs{x, w, y, rstd, rows, cols, eps, stream});
}

// dx (rows, cols) in x's dtype and dw (cols,) in w's dtype; dw_partial is fp32 scratch of
// (num_partials, cols) with num_partials from rms_norm_backward_num_partials. With rows == 0, dw is zeroed.
cudaError_t rms_norm_backward(int x_dtype, int w_dtype, const void* dy, const void* x, const void* w,
                              const float* rstd, void* dx, void* dw, float* dw_partial, int num_partials,
                              int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0) {
    const size_t elem = w_dtype == kFloat32 ? 4 : 2;
    return cudaMemsetAsync(dw, 0, static_cast<size_t>(cols) * elem, stream);
  }
  return dispatch<Backward>(x_dtype, w_dtype,
                            BwdArgs{dy, x, w, rstd, dx, dw, dw_partial, num_partials, rows, cols, stream});
}

}  // namespace megamath_rms
