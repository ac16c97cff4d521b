/*
 * parkway-gguf-gen: writes a random-weight Llama GGUF v3 model of a given shape and type
 * (see gguf_gen.h), for tests and benchmarks. Deterministic for a given seed.
 *
 *   parkway-gguf-gen --out FILE --shape smollm2-135m|llama-3.2-1b|llama-3-8b|tiny|custom
 *       [--n-layer N --n-embd N --n-ff N --n-head N --n-head-kv N --n-vocab N --n-ctx N]
 *       [--type f32|f16|bf16|q8_0|q4_0|q4_1] [--seed S] [--tied]
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf_gen.h"
#include "pw_err.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: parkway-gguf-gen --out FILE --shape "
               "smollm2-135m|llama-3.2-1b|llama-3-8b|tiny|custom\n"
               "         [--n-layer N] [--n-embd N] [--n-ff N] [--n-head N] [--n-head-kv N]\n"
               "         [--n-vocab N] [--n-ctx N] [--type f32|f16|bf16|q8_0|q4_0|q4_1]\n"
               "         [--seed S] [--tied]\n");
}

static int parse_u32(const char *opt, const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || v > UINT32_MAX || s[0] == '-') {
        fprintf(stderr, "parkway-gguf-gen: %s: bad number '%s'\n", opt, s);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

int main(int argc, char **argv)
{
    enum { O_LAYER = 256, O_EMBD, O_FF, O_HEAD, O_HEADKV, O_VOCAB, O_CTX };
    static const struct option longopts[] = {
        {"out", required_argument, NULL, 'o'},
        {"shape", required_argument, NULL, 's'},
        {"type", required_argument, NULL, 't'},
        {"seed", required_argument, NULL, 'S'},
        {"tied", no_argument, NULL, 'T'},
        {"help", no_argument, NULL, 'h'},
        {"n-layer", required_argument, NULL, O_LAYER},
        {"n-embd", required_argument, NULL, O_EMBD},
        {"n-ff", required_argument, NULL, O_FF},
        {"n-head", required_argument, NULL, O_HEAD},
        {"n-head-kv", required_argument, NULL, O_HEADKV},
        {"n-vocab", required_argument, NULL, O_VOCAB},
        {"n-ctx", required_argument, NULL, O_CTX},
        {NULL, 0, NULL, 0},
    };
    const char *out = NULL, *shape = NULL, *type = "f32";
    uint64_t seed = 0;
    bool tied = false;
    /* Overrides, applied over the preset; 0 = keep. */
    uint32_t ov[7] = {0};
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'o':
            out = optarg;
            break;
        case 's':
            shape = optarg;
            break;
        case 't':
            type = optarg;
            break;
        case 'S': {
            char *end;
            errno = 0;
            seed = strtoull(optarg, &end, 0);
            if (errno || end == optarg || *end) {
                fprintf(stderr, "parkway-gguf-gen: --seed: bad number '%s'\n", optarg);
                return 2;
            }
            break;
        }
        case 'T':
            tied = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            if (c >= O_LAYER && c <= O_CTX) {
                if (parse_u32(longopts[c - O_LAYER + 6].name, optarg, &ov[c - O_LAYER]) ||
                    ov[c - O_LAYER] == 0) {
                    fprintf(stderr, "parkway-gguf-gen: dimensions must be positive\n");
                    return 2;
                }
                break;
            }
            usage(stderr);
            return 2;
        }
    }
    if (!out || !shape || optind != argc) {
        usage(stderr);
        return 2;
    }
    struct gguf_gen_opts o;
    if (gguf_gen_preset(shape, &o)) {
        fprintf(stderr, "parkway-gguf-gen: unknown shape '%s'\n", shape);
        return 2;
    }
    if (!gguf_gen_parse_type(type, &o.type)) {
        fprintf(stderr, "parkway-gguf-gen: unknown type '%s'\n", type);
        return 2;
    }
    uint32_t *fields[7] = {&o.n_layer,   &o.n_embd,  &o.n_ff, &o.n_head,
                           &o.n_head_kv, &o.n_vocab, &o.n_ctx};
    for (int i = 0; i < 7; i++) {
        if (ov[i])
            *fields[i] = ov[i];
    }
    o.seed = seed;
    o.tied = tied;
    char err[256];
    if (gguf_gen_check(&o, err, sizeof(err))) {
        fprintf(stderr, "parkway-gguf-gen: %s\n", err);
        return 2;
    }
    /* Write to a temporary name and rename, so a reader never sees half a file. */
    size_t tl = strlen(out) + 16;
    char *tmp = malloc(tl);
    if (!tmp)
        return 1;
    snprintf(tmp, tl, "%s.tmp.%ld", out, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        fprintf(stderr, "parkway-gguf-gen: %s: %s\n", tmp, strerror(errno));
        free(tmp);
        return 1;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    enum pw_err e = gguf_gen_write(&o, f, err, sizeof(err));
    if (fclose(f) != 0 && !e) {
        e = PW_ERR_IO;
        snprintf(err, sizeof(err), "close: %s", strerror(errno));
    }
    if (!e && rename(tmp, out) != 0) {
        e = PW_ERR_IO;
        snprintf(err, sizeof(err), "rename to %s: %s", out, strerror(errno));
    }
    if (e) {
        unlink(tmp);
        fprintf(stderr, "parkway-gguf-gen: %s\n", err);
    }
    free(tmp);
    return pw_err_exit_code(e);
}
