/*
 * pw_apikey: API keys, their hashes and the bearer header.
 *
 * A key is "pk-" followed by 43 base64url characters (32 bytes from the OpenSSL CSPRNG,
 * unpadded), 46 characters in all. Only its SHA-256 is stored (the field of hash pw:keys
 * is the lowercase hex of it); keys are compared through their hashes in constant time and
 * never logged. Logs name a key by its public id, "key_" + the first 8 hex digits of the
 * hash, which reveals 32 bits of a hash of 256 random bits: nothing usable.
 *
 * Thread-safe: no shared state (OpenSSL 3 initialises itself thread-safely).
 */
#ifndef PW_APIKEY_H
#define PW_APIKEY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

#define PW_APIKEY_PREFIX "pk-"
#define PW_APIKEY_PREFIX_LEN 3
#define PW_APIKEY_RANDOM_BYTES 32
#define PW_APIKEY_BODY_LEN 43 /* base64url of 32 bytes, no padding */
#define PW_APIKEY_LEN (PW_APIKEY_PREFIX_LEN + PW_APIKEY_BODY_LEN) /* 46 */
#define PW_APIKEY_HASH_LEN 32                                     /* SHA-256 */
#define PW_APIKEY_HASH_HEX_LEN 64
#define PW_APIKEY_ID_LEN 12      /* "key_" + 8 hex */
#define PW_APIKEY_BEARER_MAX 512 /* longest credential accepted from a header, in bytes */

/* Writes a new random key and its NUL into out. PW_ERR_INTERNAL if the CSPRNG fails. */
enum pw_err pw_apikey_generate(char out[PW_APIKEY_LEN + 1]);

/* True when key[0..len) has the form of a parkway key (prefix, length, alphabet). */
bool pw_apikey_format_ok(const char *key, size_t len);

/* SHA-256 of key[0..len) into out. PW_ERR_INTERNAL if OpenSSL fails. */
enum pw_err pw_apikey_hash(const char *key, size_t len, uint8_t out[PW_APIKEY_HASH_LEN]);

/* The public id of a key from its hash: "key_" + 8 lowercase hex digits, NUL-terminated. */
void pw_apikey_id(const uint8_t hash[PW_APIKEY_HASH_LEN], char out[PW_APIKEY_ID_LEN + 1]);

/* Lowercase hex of in[0..n) into out, which has room for 2n + 1 bytes (NUL-terminated). */
void pw_hex_encode(const uint8_t *in, size_t n, char *out);

/*
 * Decodes hex[0..len) (either case) into out[0..cap). PW_ERR_PARSE for an odd length or a
 * non-hex character, PW_ERR_TOOBIG if len / 2 > cap. *n_out (may be NULL) gets len / 2.
 */
enum pw_err pw_hex_decode(const char *hex, size_t len, uint8_t *out, size_t cap, size_t *n_out);

/* Constant-time equality of a[0..n) and b[0..n) (time depends on n only). */
bool pw_ct_equal(const void *a, const void *b, size_t n);

/*
 * Parses an Authorization header value, value[0..len) (need not be NUL-terminated):
 * optional spaces, the scheme "Bearer" in any case, one or more spaces or tabs, the
 * credential (RFC 6750 token68: A-Z a-z 0-9 - . _ ~ + / then any '='), optional trailing
 * spaces. On PW_OK *key points into value (borrowed) and *key_len is its length. Returns
 * PW_ERR_AUTH for any other scheme, a missing or empty credential, a credential with
 * other characters, or one longer than PW_APIKEY_BEARER_MAX. Does not check the key format.
 */
enum pw_err pw_apikey_parse_bearer(const char *value, size_t len, const char **key,
                                   size_t *key_len);

#endif
