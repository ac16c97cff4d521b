/*
 * router_tls: server TLS context for the HTTP layer. See router_tls.h.
 * Runs at start-up on the creating thread; the ALPN callback runs on whichever worker does
 * the handshake and touches nothing but its arguments.
 */
#include "router_tls.h"

#include <stdio.h>
#include <string.h>

#include <openssl/err.h>

/* ALPN wire format: length-prefixed protocol names. */
static const unsigned char alpn_http11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};

static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, alpn_http11, sizeof alpn_http11, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}

static void ssl_errstr(char *errbuf, size_t errcap, const char *what, const char *file)
{
    unsigned long e = ERR_get_error();
    char reason[256] = "unknown error";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    if (errbuf && errcap)
        snprintf(errbuf, errcap, "%s %s: %s", what, file ? file : "", reason);
}

enum pw_err router_tls_ctx_create(const char *cert_file, const char *key_file, SSL_CTX **out,
                                  char *errbuf, size_t errcap)
{
    enum pw_err err = PW_ERR_CONFIG;
    SSL_CTX *ctx = NULL;
    *out = NULL;
    if (!cert_file || !key_file) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "TLS needs both a certificate and a key");
        goto out;
    }
    ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        ssl_errstr(errbuf, errcap, "SSL_CTX_new", NULL);
        err = PW_ERR_NOMEM;
        goto out;
    }
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)) {
        ssl_errstr(errbuf, errcap, "set_min_proto_version", NULL);
        goto out;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* Idle keep-alive connections then hold no TLS record buffers. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        ssl_errstr(errbuf, errcap, "certificate", cert_file);
        goto out;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
        ssl_errstr(errbuf, errcap, "private key", key_file);
        goto out;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        ssl_errstr(errbuf, errcap, "key does not match certificate", key_file);
        goto out;
    }
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, NULL);
    *out = ctx;
    ctx = NULL;
    err = PW_OK;
out:
    SSL_CTX_free(ctx);
    return err;
}
