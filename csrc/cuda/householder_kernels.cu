// CUDA kernels of the Householder apply (torch-free: compiled by plain nvcc in seconds).
//
// Forward on the canonical batch, Y = W - V^T A (V W) with A = T or T^T:
//   project  X += V W      grid (column tiles of 64, row splits, batch); partial sums per split are
//                          added with fp32 atomics, so every SM has work even when m is small;
//   solve    P = A X       one thread per element of P (k x m), the shared tile maths;
//   update   out = W - V^T P   grid (column tiles, row tiles, batch), one 64 x 64 tile per block.
// W is read twice and written once (the one-read floor needs X over all n rows before any update).
// fp16/bf16 with k >= 16 run both GEMM-like steps on tensor cores (WMMA 16x16x16, fp32 accumulation),
// with V's rows scaled to unit norm (and P's rows scaled up to match) to stay in fp16 range;
// everything else runs on CUDA cores in fp32. Global loads of W coalesce along its unit-stride
// dimension, whether rows (left side) or columns (right side: W arrives as a transposed view).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "../householder_tile.h"
#include "householder_launch.h"

namespace mose {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kTile = 64;                            // rows and columns of a block tile
constexpr int kThreads = 256;                        // 8 warps
constexpr int kGroups = kThreads / kTile;            // 4 thread groups along the tile's second dimension
constexpr int kPerThread = kTile * kTile / kThreads;  // 16 elements of a 64 x 64 tile per thread
constexpr int kChunk = 32;                           // rows of W (or of V) staged per step
constexpr int kJPerThread = kTile / kGroups;         // 16 accumulators per thread in project_simt

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Element q (0..15) of thread t in a 64 x 64 tile: lane t % 64 runs along W's unit-stride dimension
// (columns when rows are contiguous), so that a warp touches 32 consecutive addresses.
struct TileMap {
  bool along_columns;
  __device__ __forceinline__ void at(int t, int q, int& r, int& c) const {
    const int lane = t % kTile, group = t / kTile + kGroups * q;
    r = along_columns ? group : lane;
    c = along_columns ? lane : group;
  }
};

__global__ void factor_kernel(const float* G, float* T, int64_t k) {
  const int64_t b = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < k) tile::factor_column(G + b * k * k, k, k, j, T + b * k * k, k);
}

__global__ void solve_kernel(const float* T, const float* X, float* P, int64_t k, int64_t m, bool transpose) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j = blockIdx.y, b = blockIdx.z;
  if (c >= m) return;
  P[(b * k + j) * m + c] = tile::triangular_row(T + b * k * k, k, k, transpose, j, X + b * k * m + c, m);
}

// Stage rows [i0, i0 + kChunk) x columns [c0, c0 + 64) of W as float, coalesced along the unit stride.
template <typename scalar_t>
__device__ __forceinline__ void stage_w(const Problem& p, const scalar_t* W, int64_t i0, int64_t i1, int64_t c0,
                                        float (*Ws)[kTile + 1]) {
  for (int e = threadIdx.x; e < kChunk * kTile; e += kThreads) {
    const int ri = p.w_sm == 1 ? e / kTile : e % kChunk;
    const int ci = p.w_sm == 1 ? e % kTile : e / kChunk;
    const int64_t i = i0 + ri, c = c0 + ci;
    Ws[ri][ci] = (i < i1 && c < p.m) ? to_float(W[i * p.w_sn + c * p.w_sm]) : 0.f;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) project_simt_kernel(Problem p, int64_t rows_per_split) {
  __shared__ float Ws[kChunk][kTile + 1];
  __shared__ float Vs[kTile][kChunk + 1];
  const int64_t b = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = blockIdx.y * rows_per_split, r1 = min(p.n, r0 + rows_per_split);
  const auto* W = static_cast<const scalar_t*>(p.W) + b * p.w_sb;
  const float* V = p.V + b * p.k * p.n;
  float* X = p.X + b * p.k * p.m;
  const int t = threadIdx.x, c = t % kTile, group = t / kTile;
  for (int64_t j0 = 0; j0 < p.k; j0 += kTile) {
    float acc[kJPerThread] = {};
    for (int64_t i0 = r0; i0 < r1; i0 += kChunk) {
      __syncthreads();
      stage_w(p, W, i0, r1, c0, Ws);
      for (int e = t; e < kTile * kChunk; e += kThreads) {
        const int jj = e / kChunk, ri = e % kChunk;
        const int64_t j = j0 + jj, i = i0 + ri;
        Vs[jj][ri] = (j < p.k && i < r1) ? V[j * p.n + i] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int ri = 0; ri < kChunk; ++ri) {
        const float w = Ws[ri][c];
#pragma unroll
        for (int q = 0; q < kJPerThread; ++q) acc[q] += Vs[group + kGroups * q][ri] * w;
      }
    }
    if (c0 + c < p.m) {
#pragma unroll
      for (int q = 0; q < kJPerThread; ++q) {
        const int64_t j = j0 + group + kGroups * q;
        if (j < p.k) atomicAdd(&X[j * p.m + c0 + c], acc[q]);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) update_simt_kernel(Problem p) {
  __shared__ float Vs[kChunk][kTile];
  __shared__ float Ps[kChunk][kTile];
  const int64_t b = blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const auto* W = static_cast<const scalar_t*>(p.W) + b * p.w_sb;
  auto* out = static_cast<scalar_t*>(p.out) + b * p.o_sb;
  const float* V = p.V + b * p.k * p.n;
  const float* P = p.P + b * p.k * p.m;
  const int t = threadIdx.x;
  const TileMap map{p.w_sm == 1};
  float acc[kPerThread];
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) {
    int r, c;
    map.at(t, q, r, c);
    const int64_t i = r0 + r, cc = c0 + c;
    acc[q] = (i < p.n && cc < p.m) ? to_float(W[i * p.w_sn + cc * p.w_sm]) : 0.f;
  }
  for (int64_t j0 = 0; j0 < p.k; j0 += kChunk) {
    __syncthreads();
    for (int e = t; e < kChunk * kTile; e += kThreads) {
      const int jj = e / kTile, x = e % kTile;
      const int64_t j = j0 + jj;
      Vs[jj][x] = (j < p.k && r0 + x < p.n) ? V[j * p.n + r0 + x] : 0.f;
      Ps[jj][x] = (j < p.k && c0 + x < p.m) ? P[j * p.m + c0 + x] : 0.f;
    }
    __syncthreads();
    for (int jj = 0; jj < kChunk; ++jj) {
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) {
        int r, c;
        map.at(t, q, r, c);
        acc[q] -= Vs[jj][r] * Ps[jj][c];
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) {
    int r, c;
    map.at(t, q, r, c);
    const int64_t i = r0 + r, cc = c0 + c;
    if (i < p.n && cc < p.m) out[i * p.o_sn + cc * p.o_sm] = from_float<scalar_t>(acc[q]);
  }
}

// Tensor-core projection: per block 64 columns x a split of rows, all k in passes of 64; warp w owns
// the 16 x 16 fragments (w / 2, 2 (w % 2) + h) of the 64 x 64 block of X.
template <typename half_t>
__global__ void __launch_bounds__(kThreads) project_wmma_kernel(Problem p, int64_t rows_per_split) {
  __shared__ __align__(32) half_t Vs[kTile][kChunk];  // A (j x rows), row-major
  __shared__ __align__(32) half_t Ws[kChunk][kTile];  // B (rows x columns), row-major
  __shared__ __align__(32) float Cs[kTile][kTile];
  const int64_t b = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = blockIdx.y * rows_per_split, r1 = min(p.n, r0 + rows_per_split);
  const auto* W = static_cast<const half_t*>(p.W) + b * p.w_sb;
  const float* V = p.V + b * p.k * p.n;
  const float* scale = p.scale + b * p.k;
  float* X = p.X + b * p.k * p.m;
  const int t = threadIdx.x, warp = t / 32, fr = warp / 2, fc0 = (warp % 2) * 2;
  for (int64_t j0 = 0; j0 < p.k; j0 += kTile) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t i0 = r0; i0 < r1; i0 += kChunk) {
      __syncthreads();
      for (int e = t; e < kChunk * kTile; e += kThreads) {
        const int ri = p.w_sm == 1 ? e / kTile : e % kChunk;
        const int ci = p.w_sm == 1 ? e % kTile : e / kChunk;
        const int64_t i = i0 + ri, c = c0 + ci;
        Ws[ri][ci] = (i < r1 && c < p.m) ? W[i * p.w_sn + c * p.w_sm] : from_float<half_t>(0.f);
      }
      for (int e = t; e < kTile * kChunk; e += kThreads) {
        const int jj = e / kChunk, ri = e % kChunk;
        const int64_t j = j0 + jj, i = i0 + ri;
        Vs[jj][ri] = from_float<half_t>((j < p.k && i < r1) ? V[j * p.n + i] / scale[j] : 0.f);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half_t, wmma::row_major> a;
        wmma::load_matrix_sync(a, &Vs[fr * 16][kk], kChunk);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, half_t, wmma::row_major> bf;
          wmma::load_matrix_sync(bf, &Ws[kk][(fc0 + h) * 16], kTile);
          wmma::mma_sync(acc[h], a, bf, acc[h]);
        }
      }
    }
    __syncthreads();
    wmma::store_matrix_sync(&Cs[fr * 16][fc0 * 16], acc[0], kTile, wmma::mem_row_major);
    wmma::store_matrix_sync(&Cs[fr * 16][(fc0 + 1) * 16], acc[1], kTile, wmma::mem_row_major);
    __syncthreads();
    for (int e = t; e < kTile * kTile; e += kThreads) {
      const int jj = e / kTile, cc = e % kTile;
      const int64_t j = j0 + jj;
      if (j < p.k && c0 + cc < p.m) atomicAdd(&X[j * p.m + c0 + cc], Cs[jj][cc] * scale[j]);
    }
  }
}

// Tensor-core update of one 64 x 64 tile: C = V^T P over k in steps of 16, then out = W - C.
template <typename half_t>
__global__ void __launch_bounds__(kThreads) update_wmma_kernel(Problem p) {
  __shared__ __align__(32) half_t Vs[16][kTile];  // A = V^T (rows x j), column-major
  __shared__ __align__(32) half_t Ps[16][kTile];  // B = P (j x columns), row-major
  __shared__ __align__(32) float Cs[kTile][kTile];
  const int64_t b = blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const auto* W = static_cast<const half_t*>(p.W) + b * p.w_sb;
  auto* out = static_cast<half_t*>(p.out) + b * p.o_sb;
  const float* V = p.V + b * p.k * p.n;
  const float* P = p.P + b * p.k * p.m;
  const float* scale = p.scale + b * p.k;
  const int t = threadIdx.x, warp = t / 32, fr = warp / 2, fc0 = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int64_t j0 = 0; j0 < p.k; j0 += 16) {
    __syncthreads();
    for (int e = t; e < 16 * kTile; e += kThreads) {
      const int jj = e / kTile, x = e % kTile;
      const int64_t j = j0 + jj;
      const bool valid = j < p.k;
      const float s = valid ? scale[j] : 1.f;
      Vs[jj][x] = from_float<half_t>(valid && r0 + x < p.n ? V[j * p.n + r0 + x] / s : 0.f);
      Ps[jj][x] = from_float<half_t>(valid && c0 + x < p.m ? P[j * p.m + c0 + x] * s : 0.f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, half_t, wmma::col_major> a;
    wmma::load_matrix_sync(a, &Vs[0][fr * 16], kTile);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half_t, wmma::row_major> bf;
      wmma::load_matrix_sync(bf, &Ps[0][(fc0 + h) * 16], kTile);
      wmma::mma_sync(acc[h], a, bf, acc[h]);
    }
  }
  wmma::store_matrix_sync(&Cs[fr * 16][fc0 * 16], acc[0], kTile, wmma::mem_row_major);
  wmma::store_matrix_sync(&Cs[fr * 16][(fc0 + 1) * 16], acc[1], kTile, wmma::mem_row_major);
  __syncthreads();
  const TileMap map{p.w_sm == 1};
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) {
    int r, c;
    map.at(t, q, r, c);
    const int64_t i = r0 + r, cc = c0 + c;
    if (i < p.n && cc < p.m) {
      out[i * p.o_sn + cc * p.o_sm] = from_float<half_t>(to_float(W[i * p.w_sn + cc * p.w_sm]) - Cs[r][c]);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per split of the projection: about four blocks per SM over the whole grid.
int64_t rows_per_split(const Problem& p) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks = ceil_div(p.m, kTile) * p.b;
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * sms, blocks), 1, ceil_div(p.n, kChunk));
  return ceil_div(ceil_div(p.n, splits), kChunk) * kChunk;
}

bool use_tensor_cores(const Problem& p) { return p.dtype != DType::kFloat32 && p.k >= 16; }

template <typename scalar_t>
void project_typed(const Problem& p, cudaStream_t stream) {
  const int64_t rows = rows_per_split(p);
  const dim3 grid(ceil_div(p.m, kTile), ceil_div(p.n, rows), p.b);
  if constexpr (std::is_same_v<scalar_t, float>) {
    project_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, rows);
  } else {
    if (use_tensor_cores(p)) {
      project_wmma_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, rows);
    } else {
      project_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, rows);
    }
  }
}

template <typename scalar_t>
void update_typed(const Problem& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.m, kTile), ceil_div(p.n, kTile), p.b);
  if constexpr (std::is_same_v<scalar_t, float>) {
    update_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
  } else {
    if (use_tensor_cores(p)) {
      update_wmma_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    } else {
      update_simt_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    }
  }
}

}  // namespace

cudaError_t launch_factor(const float* G, float* T, int64_t b, int64_t k, cudaStream_t stream) {
  if (b == 0 || k == 0) return cudaSuccess;
  const int threads = static_cast<int>(std::min<int64_t>(k, 256));
  factor_kernel<<<dim3(ceil_div(k, threads), b), threads, 0, stream>>>(G, T, k);
  return cudaGetLastError();
}

cudaError_t launch_project(const Problem& p, cudaStream_t stream) {
  if (p.b == 0 || p.k == 0 || p.n == 0 || p.m == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: project_typed<float>(p, stream); break;
    case DType::kFloat16: project_typed<__half>(p, stream); break;
    case DType::kBFloat16: project_typed<__nv_bfloat16>(p, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_solve(const float* T, const float* X, float* P, int64_t b, int64_t k, int64_t m, bool transpose,
                         cudaStream_t stream) {
  if (b == 0 || k == 0 || m == 0) return cudaSuccess;
  solve_kernel<<<dim3(ceil_div(m, 256), k, b), 256, 0, stream>>>(T, X, P, k, m, transpose);
  return cudaGetLastError();
}

cudaError_t launch_update(const Problem& p, cudaStream_t stream) {
  if (p.b == 0 || p.n == 0 || p.m == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: update_typed<float>(p, stream); break;
    case DType::kFloat16: update_typed<__half>(p, stream); break;
    case DType::kBFloat16: update_typed<__nv_bfloat16>(p, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mose
