// CPU kernels for any target (the compiler's baseline instruction set, SSE2 on x86-64).
#define MOSE_CPU_ISA isa_default
#define MOSE_CPU_ISA_NAME "default"
#include "kernels.h"
