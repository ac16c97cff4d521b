/*
 * fuzz_gguf: libFuzzer target for the GGUF reader (engine_gguf_open_memory). Without
 * -fsanitize=fuzzer it links fuzz_replay.c, the replay driver shared by every target, so
 * ctest replays the corpus under ASan without libFuzzer.
 *
 * On success the whole API surface is walked, touching the first and last byte of every
 * string and tensor it hands out, so an accepted file that points out of bounds is caught.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine_gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint8_t fuzz_sink;

static void touch(const char *p, uint64_t len)
{
    if (len > 0)
        fuzz_sink ^= (uint8_t)(p[0] ^ p[len - 1]);
}

static void walk(const struct engine_gguf *g)
{
    static char key[65536]; /* keys are at most 65535 bytes */
    for (size_t i = 0; i < engine_gguf_n_kv(g); i++) {
        struct engine_gguf_str k, s;
        enum engine_gguf_type type, et;
        uint64_t n, u;
        int64_t v;
        float f;
        bool b;
        const void *raw;
        if (!engine_gguf_kv_at(g, i, &k, &type) || k.len >= sizeof(key))
            abort();
        memcpy(key, k.ptr, k.len);
        key[k.len] = '\0';
        (void)engine_gguf_get_u64(g, key, &u);
        (void)engine_gguf_get_i64(g, key, &v);
        (void)engine_gguf_get_f32(g, key, &f);
        (void)engine_gguf_get_bool(g, key, &b);
        if (engine_gguf_get_str(g, key, &s))
            touch(s.ptr, s.len);
        if (engine_gguf_get_arr(g, key, &et, &n) && n > 0) {
            for (uint64_t j = 0; j < n && j < 64; j++) {
                if (engine_gguf_arr_str(g, key, j, &s))
                    touch(s.ptr, s.len);
                (void)engine_gguf_arr_i64(g, key, j, &v);
                (void)engine_gguf_arr_f32(g, key, j, &f);
            }
            if (engine_gguf_arr_str(g, key, n - 1, &s))
                touch(s.ptr, s.len);
            (void)engine_gguf_arr_i64(g, key, n - 1, &v);
            (void)engine_gguf_arr_f32(g, key, n - 1, &f);
            if (engine_gguf_arr_data(g, key, &raw))
                fuzz_sink ^= *(const uint8_t *)raw;
        }
    }
    for (size_t i = 0; i < engine_gguf_n_tensors(g); i++) {
        const struct engine_gguf_tensor *t = engine_gguf_tensor_at(g, i);
        touch(t->data, t->size);
        if (engine_gguf_find_tensor(g, t->name) != t)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct engine_gguf *g = NULL;
    char err[256];
    /* A private exact-size copy, so reads past the end hit ASan's redzone. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    if (engine_gguf_open_memory(copy, size, &g, err, sizeof(err)) == PW_OK) {
        walk(g);
        engine_gguf_destroy(g);
    } else if (g != NULL || err[0] == '\0' || strchr(err, '\n')) {
        abort(); /* failures leave no object and give one line */
    }
    free(copy);
    return 0;
}
