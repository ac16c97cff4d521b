/*
 * pw_apikey: key generation (OpenSSL RAND_bytes), SHA-256 through EVP, hex, the bearer
 * header. Nothing here logs; callers log the public id only. Thread-safe.
 */
#include "pw_apikey.h"

#include <pthread.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <string.h>
#include <strings.h>

static const char b64url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
static const char hexdig[] = "0123456789abcdef";

static bool is_b64url(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

/* Unpadded base64url of in[0..n) into out; returns the characters written (no NUL). */
static size_t b64url_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64url[(v >> 18) & 63];
        out[o++] = b64url[(v >> 12) & 63];
        out[o++] = b64url[(v >> 6) & 63];
        out[o++] = b64url[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = b64url[(v >> 18) & 63];
        out[o++] = b64url[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = b64url[(v >> 18) & 63];
        out[o++] = b64url[(v >> 12) & 63];
        out[o++] = b64url[(v >> 6) & 63];
    }
    return o;
}

enum pw_err pw_apikey_generate(char out[PW_APIKEY_LEN + 1])
{
    uint8_t raw[PW_APIKEY_RANDOM_BYTES];

    PW_ASSERT(out != NULL);
    if (RAND_bytes(raw, (int)sizeof(raw)) != 1) {
        out[0] = '\0';
        return PW_ERR_INTERNAL;
    }
    memcpy(out, PW_APIKEY_PREFIX, PW_APIKEY_PREFIX_LEN);
    size_t n = b64url_encode(raw, sizeof(raw), out + PW_APIKEY_PREFIX_LEN);
    PW_ASSERT(n == PW_APIKEY_BODY_LEN);
    out[PW_APIKEY_LEN] = '\0';
    OPENSSL_cleanse(raw, sizeof(raw));
    return PW_OK;
}

bool pw_apikey_format_ok(const char *key, size_t len)
{
    if (key == NULL || len != PW_APIKEY_LEN ||
        memcmp(key, PW_APIKEY_PREFIX, PW_APIKEY_PREFIX_LEN) != 0)
        return false;
    for (size_t i = PW_APIKEY_PREFIX_LEN; i < len; i++) {
        if (!is_b64url((unsigned char)key[i]))
            return false;
    }
    /* 43 characters carry 258 bits: the last one holds 4 bits, its low 2 bits are 0. */
    const char *last = strchr(b64url, key[len - 1]);
    return last != NULL && ((last - b64url) & 3) == 0;
}

/* OpenSSL 3 looks an implicit EVP_sha256() up in its provider tables on every init; the
 * router hashes a key per request, so the digest is fetched once per process (and kept:
 * a global reference, never freed). */
static EVP_MD *g_sha256;
static pthread_once_t g_sha256_once = PTHREAD_ONCE_INIT;

static void sha256_fetch(void)
{
    g_sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
}

enum pw_err pw_apikey_hash(const char *key, size_t len, uint8_t out[PW_APIKEY_HASH_LEN])
{
    pthread_once(&g_sha256_once, sha256_fetch);
    const EVP_MD *md = g_sha256 ? g_sha256 : EVP_sha256();
    enum pw_err err = PW_ERR_INTERNAL;
    unsigned int n = 0;
    EVP_MD_CTX *ctx = NULL;

    PW_ASSERT(out != NULL && (key != NULL || len == 0));
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
        EVP_DigestUpdate(ctx, key != NULL ? key : "", len) != 1 ||
        EVP_DigestFinal_ex(ctx, out, &n) != 1 || n != PW_APIKEY_HASH_LEN)
        goto out;
    err = PW_OK;
out:
    EVP_MD_CTX_free(ctx);
    return err;
}

void pw_hex_encode(const uint8_t *in, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = hexdig[in[i] >> 4];
        out[2 * i + 1] = hexdig[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

enum pw_err pw_hex_decode(const char *hex, size_t len, uint8_t *out, size_t cap, size_t *n_out)
{
    if (len % 2 != 0 || (hex == NULL && len > 0))
        return PW_ERR_PARSE;
    if (len / 2 > cap)
        return PW_ERR_TOOBIG;
    for (size_t i = 0; i < len; i += 2) {
        int hi = hexval((unsigned char)hex[i]), lo = hexval((unsigned char)hex[i + 1]);
        if (hi < 0 || lo < 0)
            return PW_ERR_PARSE;
        out[i / 2] = (uint8_t)(hi << 4 | lo);
    }
    if (n_out != NULL)
        *n_out = len / 2;
    return PW_OK;
}

void pw_apikey_id(const uint8_t hash[PW_APIKEY_HASH_LEN], char out[PW_APIKEY_ID_LEN + 1])
{
    memcpy(out, "key_", 4);
    pw_hex_encode(hash, 4, out + 4);
}

bool pw_ct_equal(const void *a, const void *b, size_t n)
{
    if (n == 0)
        return true;
    return CRYPTO_memcmp(a, b, n) == 0;
}

static bool is_token68(unsigned char c)
{
    return is_b64url(c) || c == '.' || c == '~' || c == '+' || c == '/';
}

enum pw_err pw_apikey_parse_bearer(const char *value, size_t len, const char **key, size_t *key_len)
{
    static const char scheme[] = "bearer";
    size_t i = 0;

    PW_ASSERT(key != NULL && key_len != NULL);
    *key = NULL;
    *key_len = 0;
    if (value == NULL)
        return PW_ERR_AUTH;
    while (i < len && (value[i] == ' ' || value[i] == '\t'))
        i++;
    if (len - i < sizeof(scheme) - 1 || strncasecmp(value + i, scheme, sizeof(scheme) - 1) != 0)
        return PW_ERR_AUTH;
    i += sizeof(scheme) - 1;
    size_t sp = i;
    while (i < len && (value[i] == ' ' || value[i] == '\t'))
        i++;
    if (i == sp)
        return PW_ERR_AUTH; /* "Bearerxyz" or "Bearer" alone */
    size_t start = i;
    while (i < len && is_token68((unsigned char)value[i]))
        i++;
    while (i < len && value[i] == '=')
        i++;
    size_t end = i;
    while (i < len && (value[i] == ' ' || value[i] == '\t'))
        i++;
    if (i != len || end == start || end - start > PW_APIKEY_BEARER_MAX)
        return PW_ERR_AUTH;
    *key = value + start;
    *key_len = end - start;
    return PW_OK;
}
