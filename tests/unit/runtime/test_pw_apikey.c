/*
 * Unit tests for pw_apikey: SHA-256 against the FIPS 180-2 vectors, key format and
 * uniqueness, hex, the public id, constant-time equality, and the bearer header parser.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "pw_apikey.h"

static void hash_hex(const char *s, char out[PW_APIKEY_HASH_HEX_LEN + 1])
{
    uint8_t h[PW_APIKEY_HASH_LEN];
    assert_int_equal(pw_apikey_hash(s, strlen(s), h), PW_OK);
    pw_hex_encode(h, sizeof(h), out);
}

static void test_sha256_vectors(void **state)
{
    (void)state;
    char hex[PW_APIKEY_HASH_HEX_LEN + 1];
    hash_hex("", hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    hash_hex("abc", hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    hash_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");

    /* Only len bytes are hashed. */
    uint8_t a[PW_APIKEY_HASH_LEN], b[PW_APIKEY_HASH_LEN];
    assert_int_equal(pw_apikey_hash("abcdef", 3, a), PW_OK);
    assert_int_equal(pw_apikey_hash("abc", 3, b), PW_OK);
    assert_memory_equal(a, b, sizeof(a));
    assert_int_equal(pw_apikey_hash(NULL, 0, a), PW_OK);
}

static void test_generate_format_and_uniqueness(void **state)
{
    (void)state;
    enum { N = 1000 };
    char(*keys)[PW_APIKEY_LEN + 1] = calloc(N, sizeof(*keys));
    assert_non_null(keys);
    for (int i = 0; i < N; i++) {
        assert_int_equal(pw_apikey_generate(keys[i]), PW_OK);
        assert_int_equal(strlen(keys[i]), PW_APIKEY_LEN);
        assert_int_equal(strncmp(keys[i], "pk-", 3), 0);
        assert_true(pw_apikey_format_ok(keys[i], PW_APIKEY_LEN));
        for (int j = 0; j < i; j++)
            assert_string_not_equal(keys[i], keys[j]);
    }
    free(keys);
}

static void test_format_rejects(void **state)
{
    (void)state;
    char key[PW_APIKEY_LEN + 1];
    assert_int_equal(pw_apikey_generate(key), PW_OK);
    assert_false(pw_apikey_format_ok(key, PW_APIKEY_LEN - 1));
    assert_false(pw_apikey_format_ok(NULL, 0));
    char bad[PW_APIKEY_LEN + 1];
    memcpy(bad, key, sizeof(bad));
    bad[0] = 'x';
    assert_false(pw_apikey_format_ok(bad, PW_APIKEY_LEN));
    memcpy(bad, key, sizeof(bad));
    bad[10] = '+'; /* standard base64, not base64url */
    assert_false(pw_apikey_format_ok(bad, PW_APIKEY_LEN));
    memcpy(bad, key, sizeof(bad));
    bad[PW_APIKEY_LEN - 1] = 'B'; /* index 1: non-zero padding bits */
    assert_false(pw_apikey_format_ok(bad, PW_APIKEY_LEN));
    bad[PW_APIKEY_LEN - 1] = 'E'; /* index 4 */
    assert_true(pw_apikey_format_ok(bad, PW_APIKEY_LEN));
}

static void test_hex(void **state)
{
    (void)state;
    const uint8_t in[] = {0x00, 0x01, 0xab, 0xff};
    char hex[9];
    pw_hex_encode(in, sizeof(in), hex);
    assert_string_equal(hex, "0001abff");
    uint8_t out[4];
    size_t n = 0;
    assert_int_equal(pw_hex_decode("0001ABff", 8, out, sizeof(out), &n), PW_OK);
    assert_int_equal(n, 4);
    assert_memory_equal(out, in, 4);
    assert_int_equal(pw_hex_decode("abc", 3, out, sizeof(out), &n), PW_ERR_PARSE);
    assert_int_equal(pw_hex_decode("zz", 2, out, sizeof(out), &n), PW_ERR_PARSE);
    assert_int_equal(pw_hex_decode("0001abff00", 10, out, sizeof(out), &n), PW_ERR_TOOBIG);
    assert_int_equal(pw_hex_decode("", 0, out, sizeof(out), &n), PW_OK);
    assert_int_equal(n, 0);
    pw_hex_encode(in, 0, hex);
    assert_string_equal(hex, "");
}

static void test_public_id(void **state)
{
    (void)state;
    uint8_t h[PW_APIKEY_HASH_LEN];
    char id[PW_APIKEY_ID_LEN + 1];
    assert_int_equal(pw_apikey_hash("abc", 3, h), PW_OK);
    pw_apikey_id(h, id);
    assert_string_equal(id, "key_ba7816bf");
    assert_int_equal(strlen(id), PW_APIKEY_ID_LEN);
}

static void test_ct_equal(void **state)
{
    (void)state;
    assert_true(pw_ct_equal("abcd", "abcd", 4));
    assert_false(pw_ct_equal("abcd", "abce", 4));
    assert_false(pw_ct_equal("xbcd", "abcd", 4));
    assert_true(pw_ct_equal("a", "b", 0));
}

static enum pw_err bearer(const char *v, char *key, size_t cap)
{
    const char *k = NULL;
    size_t kl = 0;
    enum pw_err err = pw_apikey_parse_bearer(v, strlen(v), &k, &kl);
    if (err == PW_OK) {
        assert_true(kl < cap);
        memcpy(key, k, kl);
        key[kl] = '\0';
    } else {
        assert_null(k);
        assert_int_equal(kl, 0);
    }
    return err;
}

static void test_parse_bearer(void **state)
{
    (void)state;
    char key[PW_APIKEY_BEARER_MAX + 1];
    assert_int_equal(bearer("Bearer pk-abc_DEF-123", key, sizeof(key)), PW_OK);
    assert_string_equal(key, "pk-abc_DEF-123");
    assert_int_equal(bearer("bearer pk-x", key, sizeof(key)), PW_OK);
    assert_string_equal(key, "pk-x");
    assert_int_equal(bearer("  BEARER \t pk-x  ", key, sizeof(key)), PW_OK);
    assert_string_equal(key, "pk-x");
    assert_int_equal(bearer("Bearer abc+/.~==", key, sizeof(key)), PW_OK);
    assert_string_equal(key, "abc+/.~==");

    assert_int_equal(bearer("", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer ", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer    ", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearerpk-x", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Basic dXNlcjpwYXNz", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer pk-x extra", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer pk-x\r\n", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer pk=x", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bearer \"pk-x\"", key, sizeof(key)), PW_ERR_AUTH);
    assert_int_equal(bearer("Bear", key, sizeof(key)), PW_ERR_AUTH);

    /* Not NUL-terminated: only len bytes are read. */
    const char *k;
    size_t kl;
    assert_int_equal(pw_apikey_parse_bearer("Bearer pk-xyz GARBAGE", 13, &k, &kl), PW_OK);
    assert_int_equal(kl, 6);
    assert_memory_equal(k, "pk-xyz", 6);
    assert_int_equal(pw_apikey_parse_bearer(NULL, 0, &k, &kl), PW_ERR_AUTH);

    /* Length cap. */
    char *big = malloc(PW_APIKEY_BEARER_MAX + 16);
    strcpy(big, "Bearer ");
    memset(big + 7, 'a', PW_APIKEY_BEARER_MAX);
    big[7 + PW_APIKEY_BEARER_MAX] = '\0';
    assert_int_equal(pw_apikey_parse_bearer(big, strlen(big), &k, &kl), PW_OK);
    assert_int_equal(kl, PW_APIKEY_BEARER_MAX);
    strcat(big, "a");
    assert_int_equal(pw_apikey_parse_bearer(big, strlen(big), &k, &kl), PW_ERR_AUTH);
    free(big);

    /* A generated key survives the round trip through a header. */
    char gen[PW_APIKEY_LEN + 1], hdr[64];
    assert_int_equal(pw_apikey_generate(gen), PW_OK);
    strcpy(hdr, "Bearer ");
    strcat(hdr, gen);
    assert_int_equal(bearer(hdr, key, sizeof(key)), PW_OK);
    assert_string_equal(key, gen);
    assert_true(pw_apikey_format_ok(key, strlen(key)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_generate_format_and_uniqueness),
        cmocka_unit_test(test_format_rejects),
        cmocka_unit_test(test_hex),
        cmocka_unit_test(test_public_id),
        cmocka_unit_test(test_ct_equal),
        cmocka_unit_test(test_parse_bearer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
