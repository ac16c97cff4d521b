/*
 * kernel_cuda_plugin: finds and loads libparkway_cuda.so (see the header).
 */
#include "kernel_cuda_plugin.h"
#include "pw_cli.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static const struct kernel_cuda_plugin *g_plugin; /* loaded once, never unloaded */

static void plugin_path(char *out, size_t cap)
{
    const char *env = getenv("PW_CUDA_PLUGIN");
    if (env && env[0]) {
        snprintf(out, cap, "%s", env);
        return;
    }
    (void)pw_cli_exe_rel(out, cap, KERNEL_CUDA_PLUGIN_FILE); /* next to the executable */
}

static const struct kernel_cuda_plugin *load(char *why, size_t cap)
{
    char path[PATH_MAX + 32];
    plugin_path(path, sizeof path);
    if (access(path, R_OK) != 0) {
        snprintf(why, cap, "no CUDA module at %s (built without CUDA?)", path);
        return NULL;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(why, cap, "cannot load %s: %s", path, e ? e : "?");
        return NULL;
    }
    const struct kernel_cuda_plugin *p = dlsym(h, KERNEL_CUDA_PLUGIN_SYMBOL);
    if (!p || p->abi != KERNEL_CUDA_PLUGIN_ABI || p->ops_size != sizeof(struct kernel_ops) ||
        !p->device_count || !p->create) {
        snprintf(why, cap, "%s is not a CUDA module of this build (abi %u)", path,
                 p ? (unsigned)p->abi : 0u);
        dlclose(h);
        return NULL;
    }
    return p;
}

const struct kernel_cuda_plugin *kernel_cuda_plugin_load(char *why, size_t cap)
{
    char scratch[8];
    if (!why || cap == 0) {
        why = scratch;
        cap = sizeof scratch;
    }
    why[0] = '\0';
    pthread_mutex_lock(&g_lock);
    if (!g_plugin)
        g_plugin = load(why, cap);
    const struct kernel_cuda_plugin *p = g_plugin;
    pthread_mutex_unlock(&g_lock);
    return p;
}
