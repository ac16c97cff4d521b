/*
 * engine_stop: streaming stop strings with one KMP automaton per stop; see engine_stop.h.
 *
 * Invariant between calls: state[i] is the length of the longest suffix of the stream that
 * is a proper prefix of stop i, and held[] holds the last max_i state[i] bytes of the
 * stream. Those bytes may still become a stop, so they are never emitted early; every byte
 * before them cannot be part of any stop occurrence that ends in the future.
 *
 * Stops are valid UTF-8 and pieces are complete UTF-8, so a held suffix (which starts with a
 * stop's first byte, a lead byte) always begins on a character boundary: what is emitted is
 * whole characters.
 */
#include "engine_stop.h"

#include <stdio.h>
#include <string.h>

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else {
            return false;
        }
        if (n - i - 1 < k)
            return false;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
        i += k + 1;
    }
    return true;
}

enum pw_err engine_stop_init(struct engine_stop *m, const struct engine_stop_str *stops, size_t n,
                             char *errbuf, size_t errlen)
{
    memset(m, 0, sizeof(*m));
    m->stop_index = -1;
    if (n > ENGINE_STOP_MAX_STOPS) {
        if (errbuf && errlen > 0)
            snprintf(errbuf, errlen, "stop: at most %d stop strings, got %zu",
                     ENGINE_STOP_MAX_STOPS, n);
        return PW_ERR_INVAL;
    }
    for (size_t i = 0; i < n; i++) {
        const char *why = NULL;
        if (stops[i].len == 0)
            why = "is empty";
        else if (stops[i].len > ENGINE_STOP_MAX_BYTES)
            why = "is too long";
        else if (!utf8_valid((const unsigned char *)stops[i].ptr, stops[i].len))
            why = "is not valid UTF-8";
        if (why) {
            if (errbuf && errlen > 0)
                snprintf(errbuf, errlen, "stop[%zu] %s (1 to %d bytes of UTF-8)", i, why,
                         ENGINE_STOP_MAX_BYTES);
            memset(m, 0, sizeof(*m));
            m->stop_index = -1;
            return PW_ERR_INVAL;
        }
    }
    m->n_stops = (int)n;
    for (size_t i = 0; i < n; i++) {
        size_t len = stops[i].len;
        const char *s = m->str[i];
        memcpy(m->str[i], stops[i].ptr, len);
        m->len[i] = len;
        if (len > m->max_len)
            m->max_len = len;
        /* fail[q]: the longest proper border of s[0..q]. */
        m->fail[i][0] = 0;
        size_t k = 0;
        for (size_t q = 1; q < len; q++) {
            while (k > 0 && s[q] != s[k])
                k = m->fail[i][k - 1];
            if (s[q] == s[k])
                k++;
            m->fail[i][q] = (uint16_t)k;
        }
    }
    return PW_OK;
}

void engine_stop_reset(struct engine_stop *m)
{
    memset(m->state, 0, sizeof(m->state));
    m->held_len = 0;
    m->stopped = false;
    m->stop_index = -1;
}

size_t engine_stop_held(const struct engine_stop *m)
{
    return m->held_len;
}

/*
 * Releases the first n bytes of (held + text) into out. The held part is copied to m->out
 * first because held[] is rewritten right after.
 */
static void release(struct engine_stop *m, const char *text, size_t n, struct engine_stop_emit *out)
{
    size_t from_held = n < m->held_len ? n : m->held_len;
    if (from_held > 0) {
        memcpy(m->out, m->held, from_held);
        out->held = m->out;
        out->held_len = from_held;
    }
    if (n > from_held) {
        out->text = text;
        out->text_len = n - from_held;
    }
}

static void emit_init(const struct engine_stop *m, struct engine_stop_emit *out)
{
    memset(out, 0, sizeof(*out));
    out->stopped = m->stopped;
    out->stop_index = m->stop_index;
}

void engine_stop_feed(struct engine_stop *m, const char *text, size_t len,
                      struct engine_stop_emit *out)
{
    emit_init(m, out);
    if (m->stopped)
        return;
    if (m->n_stops == 0) {
        if (len > 0) {
            out->text = text;
            out->text_len = len;
        }
        return;
    }

    const size_t h0 = m->held_len;
    for (size_t j = 0; j < len; j++) {
        char b = text[j];
        int best = -1;
        for (int i = 0; i < m->n_stops; i++) {
            size_t st = m->state[i]; /* < len[i]: a full match ends the stream */
            const char *s = m->str[i];
            while (st > 0 && s[st] != b)
                st = m->fail[i][st - 1];
            if (s[st] == b)
                st++;
            m->state[i] = (uint16_t)st;
            if (st == m->len[i] && (best < 0 || m->len[i] > m->len[best]))
                best = i;
        }
        if (best >= 0) {
            /* Position in (held + text) where the stop begins; never inside what was
             * already emitted, because its first len-1 bytes were held. */
            size_t start = h0 + j + 1 - m->len[best];
            release(m, text, start, out);
            m->stopped = true;
            m->stop_index = best;
            m->held_len = 0;
            out->stopped = true;
            out->stop_index = best;
            return;
        }
    }

    size_t h1 = 0;
    for (int i = 0; i < m->n_stops; i++)
        if (m->state[i] > h1)
            h1 = m->state[i];
    release(m, text, h0 + len - h1, out);
    if (h1 <= len) {
        if (h1 > 0)
            memcpy(m->held, text + len - h1, h1);
    } else {
        size_t keep = h1 - len; /* tail of the old held bytes */
        memmove(m->held, m->held + h0 - keep, keep);
        if (len > 0)
            memcpy(m->held + keep, text, len);
    }
    m->held_len = h1;
}

void engine_stop_flush(struct engine_stop *m, struct engine_stop_emit *out)
{
    emit_init(m, out);
    if (m->stopped)
        return;
    release(m, NULL, m->held_len, out);
    m->held_len = 0;
    memset(m->state, 0, sizeof(m->state));
}
