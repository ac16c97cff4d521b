/*
 * kernel_cuda: the CUDA implementation of struct kernel_ops (kernels/kernel.h). One backend
 * drives one device through one stream and one cuBLAS handle; weights are uploaded once at
 * weight_create and stay resident, the paged F16 KV cache lives in device memory, and ops
 * are queued on the stream (results reach the host through ops->download or ops->sync).
 * Like every backend it is used by one thread at a time. See docs/internals/cuda.md.
 *
 * This header is plain C (the engine is C11); the implementation is CUDA C++ in
 * kernels/cuda/kernel_cuda*.cu and exports these functions with C linkage.
 */
#ifndef KERNEL_CUDA_H
#define KERNEL_CUDA_H

#include <stddef.h>

#include "kernel.h"
#include "pw_err.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Options of the CUDA backend; zero-initialised means defaults. */
struct kernel_cuda_opts {
    int device; /* CUDA device ordinal; 0 = the first device */
};

/*
 * Number of usable CUDA devices: 0 when there is no device, no driver or the driver is
 * too old for this runtime (the runtime error is cleared, nothing is logged above DEBUG).
 * Cheap enough to call once per engine start.
 */
int kernel_cuda_device_count(void);

/*
 * Creates the CUDA backend on opts->device (opts NULL: device 0): a stream, a cuBLAS
 * handle, nothing else until reserve. UNSUPPORTED when there is no such device, INTERNAL
 * for any other CUDA or cuBLAS failure (logged with the statement and file:line).
 * Destroy with be->ops->destroy(be).
 */
enum pw_err kernel_cuda_create(const struct kernel_cuda_opts *opts, struct kernel_backend **out);

/*
 * Free and total memory of the backend's device, in bytes (cudaMemGetInfo), for sizing the
 * KV cache as a fraction of what is free after the weights are resident.
 */
enum pw_err kernel_cuda_mem_info(struct kernel_backend *be, size_t *free_bytes,
                                 size_t *total_bytes);

/*
 * Device probes for benchmarks (bench/bench_gpu.c): the device-to-device copy bandwidth
 * in GB/s (bytes read plus bytes written, over a 1 GiB buffer, best of several copies) and
 * the cuBLAS BF16 GEMM rate in TFLOP/s (8192^3 with F32 accumulation, best of several).
 * Both allocate and free their own buffers; neither is meant for the serving path.
 */
/* Rows per warp of the decode matrix-vector kernel: 1, 2 or 4, or 0 to choose per launch
 * (the default); for benchmarks comparing them, process-wide. */
void kernel_cuda_set_gemv_rows(int rows);

enum pw_err kernel_cuda_probe_bandwidth(struct kernel_backend *be, double *gbps);
enum pw_err kernel_cuda_probe_gemm(struct kernel_backend *be, double *tflops);

#ifdef __cplusplus
}
#endif

#endif
