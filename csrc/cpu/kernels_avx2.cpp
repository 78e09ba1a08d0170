// CPU kernels compiled for AVX2 + FMA, chosen at run time when the processor has them (a distributed
// build must not assume them: no -march=native). Dependencies are included before the target
// pragma so that only the kernels themselves are compiled for AVX2.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../householder_tile.h"
#include "kernels_api.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define MOSE_CPU_ISA isa_avx2
#define MOSE_CPU_ISA_NAME "avx2"
#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
