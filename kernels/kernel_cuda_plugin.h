/*
 * kernel_cuda_plugin: the CUDA backend as a module the engine loads only when it is asked
 * for a GPU (libparkway_cuda.so, built from kernels/cuda when PW_CUDA is on).
 *
 * Why a module: linking cudart and cuBLAS into every engine cost a CPU-only engine about
 * 150 MiB of resident memory (bench_engine peak RSS 387.5 MiB linked, 236 MiB not; the
 * loader maps and relocates them) for code it never runs. The module is found through
 * PW_CUDA_PLUGIN (a path), else next to the running executable. It leaves the runtime's logging and
 * assert functions to the executable (built with ENABLE_EXPORTS), so both share one log sink.
 *
 * Plain C, also included by the module's C++ (CUDA) side.
 */
#ifndef KERNEL_CUDA_PLUGIN_H
#define KERNEL_CUDA_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "kernel.h"
#include "pw_err.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KERNEL_CUDA_PLUGIN_ABI 3
#define KERNEL_CUDA_PLUGIN_FILE "libparkway_cuda.so"
#define KERNEL_CUDA_PLUGIN_SYMBOL "pw_kernel_cuda_plugin"

struct kernel_cuda_opts; /* kernels/cuda/kernel_cuda.h; NULL = defaults */

/* What the module exports, under KERNEL_CUDA_PLUGIN_SYMBOL. */
struct kernel_cuda_plugin {
    uint32_t abi;      /* KERNEL_CUDA_PLUGIN_ABI */
    uint32_t ops_size; /* sizeof(struct kernel_ops) the module was built with */
    int (*device_count)(void);
    enum pw_err (*create)(const struct kernel_cuda_opts *opts, struct kernel_backend **out);
};

/*
 * Loads the module once per process (later calls return the same table) and checks its ABI.
 * NULL when there is none or it cannot load (no CUDA runtime on this machine, a module of
 * another build): why says which, in one line. The module stays loaded.
 */
const struct kernel_cuda_plugin *kernel_cuda_plugin_load(char *why, size_t cap);

#ifdef __cplusplus
}
#endif

#endif
