// The tile-maths test compiled by nvcc, so the __host__ __device__ variant of householder_tile.h
// (the code the CUDA kernels inline) is exercised on the host too. Launches nothing: no GPU needed.
#include "test_tile.cpp"
