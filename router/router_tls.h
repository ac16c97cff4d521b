/*
 * router_tls: the router's server-side TLS context (OpenSSL). TLS 1.2 is the minimum,
 * compression and renegotiation are off, ALPN selects "http/1.1" (the only protocol the
 * router speaks; a client offering only others gets no ALPN answer and may go on or not).
 *
 * Threading: create once at start-up; the SSL_CTX is then shared read-only by every worker
 * (OpenSSL makes SSL_new on a shared context thread-safe).
 */
#ifndef ROUTER_TLS_H
#define ROUTER_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>

#include "pw_err.h"

/*
 * Loads a PEM certificate chain and private key into a new server context.
 * On error returns PW_ERR_CONFIG with the OpenSSL reason in errbuf (errcap bytes).
 * The caller owns *out and frees it with SSL_CTX_free().
 */
enum pw_err router_tls_ctx_create(const char *cert_file, const char *key_file, SSL_CTX **out,
                                  char *errbuf, size_t errcap);

#endif
