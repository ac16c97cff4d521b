/*
 * engine_stop: streaming stop-string matcher for one sequence.
 *
 * The engine feeds the detokenized text of each new token (complete UTF-8 pieces). The
 * matcher emits the bytes that can no longer be part of a stop string and holds back the
 * longest suffix of the stream that is a prefix of some stop string. When a stop string
 * completes, possibly spanning many pieces, it reports which one and emits only the text
 * before it; the stop string and anything after it are never emitted. At the end of
 * generation for another reason (length, eos) engine_stop_flush() releases what is held.
 *
 * Which stop wins: the first to complete in the stream (earliest end byte); among stops
 * completing on the same byte, the longest (it starts earliest). This is the only rule a
 * streaming matcher can follow without waiting for future text.
 *
 * Cost: one KMP automaton per stop string, O(total bytes x number of stops); the held-back
 * text is at most (longest stop - 1) bytes. No allocation: the matcher is a caller-owned
 * struct of fixed size.
 *
 *   stream:  | emitted .................... | held (prefix of a stop) | next piece ... |
 *
 * Not thread-safe; one matcher per sequence, used by the thread that owns it.
 */
#ifndef ENGINE_STOP_H
#define ENGINE_STOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

/* Caps: OpenAI allows 4 stop strings. Override at build time with -D if needed. */
#ifndef ENGINE_STOP_MAX_STOPS
#define ENGINE_STOP_MAX_STOPS 4
#endif
#ifndef ENGINE_STOP_MAX_BYTES
#define ENGINE_STOP_MAX_BYTES 256 /* longest stop string, bytes of UTF-8 */
#endif
_Static_assert(ENGINE_STOP_MAX_BYTES <= 65535, "KMP state is uint16_t");

/* A borrowed string: len bytes at ptr, not NUL-terminated. */
struct engine_stop_str {
    const char *ptr;
    size_t len;
};

/*
 * What one feed or flush call releases, in order: first held[0..held_len) (bytes held back
 * earlier, inside the matcher, valid until the next call), then text[0..text_len) (a
 * prefix of the caller's input). Either may be empty.
 */
struct engine_stop_emit {
    const char *held;
    size_t held_len;
    const char *text;
    size_t text_len;
    bool stopped;   /* a stop string has completed (sticky: true on every later call) */
    int stop_index; /* which stop, index into the list given to init; -1 when not stopped */
};

/* Fields are private; the struct is public so the caller can embed it (no allocation). */
struct engine_stop {
    int n_stops;
    size_t len[ENGINE_STOP_MAX_STOPS];                           /* bytes of each stop */
    char str[ENGINE_STOP_MAX_STOPS][ENGINE_STOP_MAX_BYTES];      /* the stops, copied */
    uint16_t fail[ENGINE_STOP_MAX_STOPS][ENGINE_STOP_MAX_BYTES]; /* KMP failure function */
    uint16_t state[ENGINE_STOP_MAX_STOPS]; /* bytes of stop i matched by the stream's end */
    size_t max_len;                        /* longest stop */
    char held[ENGINE_STOP_MAX_BYTES];      /* the held-back suffix of the stream */
    size_t held_len;
    char out[ENGINE_STOP_MAX_BYTES]; /* released held bytes of the last call */
    bool stopped;
    int stop_index;
};

/*
 * Sets up m for stops[0..n) (copied; n may be 0: everything passes through). Each stop must
 * be 1..ENGINE_STOP_MAX_BYTES bytes of valid UTF-8 and n <= ENGINE_STOP_MAX_STOPS;
 * otherwise PW_ERR_INVAL with a message naming the stop in errbuf (may be NULL).
 */
enum pw_err engine_stop_init(struct engine_stop *m, const struct engine_stop_str *stops, size_t n,
                             char *errbuf, size_t errlen);

/* Back to an empty stream with the same stops. */
void engine_stop_reset(struct engine_stop *m);

/*
 * Feeds len bytes of new text (borrowed for the call). Fills *out with what may be emitted
 * now. After a stop, emits nothing more.
 */
void engine_stop_feed(struct engine_stop *m, const char *text, size_t len,
                      struct engine_stop_emit *out);

/* End of generation without a stop: releases the held-back bytes (nothing once stopped). */
void engine_stop_flush(struct engine_stop *m, struct engine_stop_emit *out);

/* Bytes currently held back. */
size_t engine_stop_held(const struct engine_stop *m);

#endif
