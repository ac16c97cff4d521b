/*
 * The table libparkway_cuda.so exports for the engine's loader (kernels/kernel_cuda_plugin.h).
 * Also compiled into the static CUDA library, where nothing looks it up.
 */
#include "kernel_cuda.h"
#include "kernel_cuda_plugin.h"

extern "C" __attribute__((visibility("default")))
const struct kernel_cuda_plugin pw_kernel_cuda_plugin = {
    KERNEL_CUDA_PLUGIN_ABI, (uint32_t)sizeof(struct kernel_ops), kernel_cuda_device_count,
    kernel_cuda_create};
