/*
 * engine_unicode: strict UTF-8 decoding (maximal-subpart error units) and class lookup
 * by binary search over the generated range table, with an ASCII fast path.
 */
#include "engine_unicode.h"

unsigned engine_unicode_class(uint32_t cp)
{
    if (cp < 0x80) {
        if (cp >= 'a' && cp <= 'z')
            return ENGINE_UCLASS_LETTER;
        if (cp >= 'A' && cp <= 'Z')
            return ENGINE_UCLASS_LETTER;
        if (cp >= '0' && cp <= '9')
            return ENGINE_UCLASS_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D))
            return ENGINE_UCLASS_SPACE;
        return 0;
    }
    if (cp > 0x10FFFF)
        return 0;
    unsigned lo = 0, hi = engine_unicode_n_ranges;
    while (lo < hi) {
        unsigned mid = lo + (hi - lo) / 2;
        const struct engine_unicode_range *r = &engine_unicode_ranges[mid];
        if (cp < r->lo)
            hi = mid;
        else if (cp > r->hi)
            lo = mid + 1;
        else
            return r->flags;
    }
    return 0;
}

size_t engine_utf8_next(const uint8_t *s, size_t len, uint32_t *cp, bool *truncated)
{
    uint8_t b0 = s[0];
    if (truncated)
        *truncated = false;
    if (b0 < 0x80) {
        *cp = b0;
        return 1;
    }
    size_t need;
    uint32_t v;
    uint8_t lo2 = 0x80, hi2 = 0xBF; /* allowed range of the second byte */
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 2;
        v = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 3;
        v = b0 & 0x0F;
        if (b0 == 0xE0)
            lo2 = 0xA0; /* overlong */
        else if (b0 == 0xED)
            hi2 = 0x9F; /* surrogates */
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 4;
        v = b0 & 0x07;
        if (b0 == 0xF0)
            lo2 = 0x90; /* overlong */
        else if (b0 == 0xF4)
            hi2 = 0x8F; /* past U+10FFFF */
    } else {
        *cp = ENGINE_UTF8_INVALID;
        return 1;
    }
    size_t i = 1;
    for (; i < need; i++) {
        if (i >= len) {
            if (truncated)
                *truncated = true;
            *cp = ENGINE_UTF8_INVALID;
            return i;
        }
        uint8_t lo = i == 1 ? lo2 : 0x80, hi = i == 1 ? hi2 : 0xBF;
        if (s[i] < lo || s[i] > hi) {
            *cp = ENGINE_UTF8_INVALID;
            return i;
        }
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return need;
}

size_t engine_utf8_encode(uint32_t cp, uint8_t out[4])
{
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp >= 0xD800 && cp <= 0xDFFF)
        return 0;
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp > 0x10FFFF)
        return 0;
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

bool engine_utf8_valid(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        i += engine_utf8_next(s + i, len - i, &cp, NULL);
        if (cp == ENGINE_UTF8_INVALID)
            return false;
    }
    return true;
}
