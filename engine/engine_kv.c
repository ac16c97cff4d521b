/*
 * engine_kv: paged KV-cache bookkeeping with prefix reuse (see engine_kv.h).
 *
 * Free blocks sit on two doubly-linked lists:
 *   PLAIN   blocks without reusable content, a stack: the most recently freed is taken
 *           first, so blocks whose pages are already resident are reused before untouched
 *           ones (the cache is an anonymous mapping: untouched blocks cost no memory);
 *   CACHED  blocks holding a registered prefix, in the order they were freed: the least
 *           recently used is evicted first.
 * Blocks come from PLAIN while the cached ones number at most cache_budget (a sixteenth of
 * the pool); past it the oldest cached block is evicted instead, so retained prefixes
 * cannot walk the whole pool into memory. Registered blocks are found through a chained
 * hash table keyed by the block's chain hash.
 */
#include "engine_kv.h"

#include <stdlib.h>
#include <string.h>

#define NIL UINT32_MAX
#define LIST_PLAIN 0
#define LIST_CACHED 1

struct engine_kv_pool {
    uint32_t n_blocks;
    uint32_t block_size;     /* tokens per block */
    uint32_t max_seq_blocks; /* blocks one sequence may hold */
    uint32_t *refcount;      /* (n_blocks) sequences mapping the block */
    uint64_t *hash;          /* (n_blocks) chain hash, valid when registered */
    uint64_t *parent_hash;   /* (n_blocks) chain hash of the previous block */
    int32_t *tokens;         /* (n_blocks, block_size) token ids, valid when registered */
    uint8_t *registered;     /* (n_blocks) findable through the table */
    uint8_t *in_free;        /* (n_blocks) 0, or 1 + the free list it is on */
    uint32_t *free_prev;     /* (n_blocks) free list links */
    uint32_t *free_next;
    struct {
        uint32_t head, tail, n;
    } lists[2];            /* LIST_PLAIN, LIST_CACHED */
    uint32_t n_free;       /* on either list */
    uint32_t cache_budget; /* cached free blocks kept before evicting instead */
    uint32_t *bucket;      /* (n_buckets) first block of each hash chain */
    uint32_t *bucket_next; /* (n_blocks) next block in the same chain */
    uint32_t n_buckets;    /* power of two */
    uint64_t hit_tokens, lookup_tokens;
};

static uint64_t chain_hash(uint64_t parent, const int32_t *tokens, uint32_t n)
{
    uint64_t h = parent ^ 0x6a09e667f3bcc909ull;
    for (uint32_t i = 0; i < n; i++) {
        h ^= (uint32_t)tokens[i];
        h *= 0x9e3779b97f4a7c15ull;
        h ^= h >> 29;
    }
    return h;
}

static void free_unlink(struct engine_kv_pool *p, uint32_t b)
{
    int l = p->in_free[b] - 1;
    PW_ASSERT(l == LIST_PLAIN || l == LIST_CACHED);
    uint32_t prev = p->free_prev[b], next = p->free_next[b];
    if (prev != NIL)
        p->free_next[prev] = next;
    else
        p->lists[l].head = next;
    if (next != NIL)
        p->free_prev[next] = prev;
    else
        p->lists[l].tail = prev;
    p->in_free[b] = 0;
    p->lists[l].n--;
    p->n_free--;
}

/* Plain blocks go on top of their stack; cached ones at the young end of their queue. */
static void free_push(struct engine_kv_pool *p, uint32_t b, int l)
{
    if (l == LIST_CACHED) {
        p->free_prev[b] = p->lists[l].tail;
        p->free_next[b] = NIL;
        if (p->lists[l].tail != NIL)
            p->free_next[p->lists[l].tail] = b;
        else
            p->lists[l].head = b;
        p->lists[l].tail = b;
    } else {
        p->free_next[b] = p->lists[l].head;
        p->free_prev[b] = NIL;
        if (p->lists[l].head != NIL)
            p->free_prev[p->lists[l].head] = b;
        else
            p->lists[l].tail = b;
        p->lists[l].head = b;
    }
    p->in_free[b] = (uint8_t)(l + 1);
    p->lists[l].n++;
    p->n_free++;
}

/* The block a reservation takes next (n_free > 0). */
static uint32_t free_take(const struct engine_kv_pool *p)
{
    if (p->lists[LIST_PLAIN].n == 0 || p->lists[LIST_CACHED].n > p->cache_budget)
        return p->lists[LIST_CACHED].head;
    return p->lists[LIST_PLAIN].head;
}

static void table_insert(struct engine_kv_pool *p, uint32_t b)
{
    uint32_t i = (uint32_t)(p->hash[b] & (p->n_buckets - 1));
    p->bucket_next[b] = p->bucket[i];
    p->bucket[i] = b;
    p->registered[b] = 1;
}

static void table_remove(struct engine_kv_pool *p, uint32_t b)
{
    uint32_t *link = &p->bucket[p->hash[b] & (p->n_buckets - 1)];
    while (*link != NIL && *link != b)
        link = &p->bucket_next[*link];
    if (*link == b)
        *link = p->bucket_next[b];
    p->registered[b] = 0;
}

static uint32_t table_find(const struct engine_kv_pool *p, uint64_t h, uint64_t parent,
                           const int32_t *tokens)
{
    for (uint32_t b = p->bucket[h & (p->n_buckets - 1)]; b != NIL; b = p->bucket_next[b]) {
        if (p->hash[b] == h && p->parent_hash[b] == parent &&
            memcmp(p->tokens + (size_t)b * p->block_size, tokens, p->block_size * sizeof *tokens) ==
                0)
            return b;
    }
    return NIL;
}

enum pw_err engine_kv_pool_create(uint32_t n_blocks, uint32_t block_size, uint32_t max_seq_tokens,
                                  struct engine_kv_pool **out)
{
    *out = NULL;
    if (n_blocks == 0 || block_size == 0 || max_seq_tokens == 0 || n_blocks >= NIL / 2)
        return PW_ERR_INVAL;
    struct engine_kv_pool *p = calloc(1, sizeof *p);
    if (!p)
        return PW_ERR_NOMEM;
    p->n_blocks = n_blocks;
    p->block_size = block_size;
    p->max_seq_blocks = (uint32_t)(((uint64_t)max_seq_tokens + block_size - 1) / block_size);
    p->n_buckets = 1;
    while (p->n_buckets < 2 * n_blocks)
        p->n_buckets <<= 1;
    p->refcount = calloc(n_blocks, sizeof *p->refcount);
    p->hash = calloc(n_blocks, sizeof *p->hash);
    p->parent_hash = calloc(n_blocks, sizeof *p->parent_hash);
    p->tokens = calloc((size_t)n_blocks * block_size, sizeof *p->tokens);
    p->registered = calloc(n_blocks, 1);
    p->in_free = calloc(n_blocks, 1);
    p->free_prev = malloc(n_blocks * sizeof *p->free_prev);
    p->free_next = malloc(n_blocks * sizeof *p->free_next);
    p->bucket = malloc(p->n_buckets * sizeof *p->bucket);
    p->bucket_next = malloc(n_blocks * sizeof *p->bucket_next);
    if (!p->refcount || !p->hash || !p->parent_hash || !p->tokens || !p->registered ||
        !p->in_free || !p->free_prev || !p->free_next || !p->bucket || !p->bucket_next) {
        engine_kv_pool_destroy(p);
        return PW_ERR_NOMEM;
    }
    for (uint32_t i = 0; i < p->n_buckets; i++)
        p->bucket[i] = NIL;
    p->lists[0].head = p->lists[0].tail = p->lists[1].head = p->lists[1].tail = NIL;
    p->cache_budget = n_blocks / 16 > 0 ? n_blocks / 16 : 1;
    for (uint32_t b = n_blocks; b-- > 0;)
        free_push(p, b, LIST_PLAIN); /* block 0 on top */
    *out = p;
    return PW_OK;
}

void engine_kv_pool_destroy(struct engine_kv_pool *p)
{
    if (!p)
        return;
    free(p->refcount);
    free(p->hash);
    free(p->parent_hash);
    free(p->tokens);
    free(p->registered);
    free(p->in_free);
    free(p->free_prev);
    free(p->free_next);
    free(p->bucket);
    free(p->bucket_next);
    free(p);
}

uint32_t engine_kv_pool_block_size(const struct engine_kv_pool *p)
{
    return p->block_size;
}

uint32_t engine_kv_pool_n_blocks(const struct engine_kv_pool *p)
{
    return p->n_blocks;
}

uint32_t engine_kv_pool_n_free(const struct engine_kv_pool *p)
{
    return p->n_free;
}

uint64_t engine_kv_pool_hit_tokens(const struct engine_kv_pool *p)
{
    return p->hit_tokens;
}

uint64_t engine_kv_pool_lookup_tokens(const struct engine_kv_pool *p)
{
    return p->lookup_tokens;
}

enum pw_err engine_kv_seq_init(struct engine_kv_pool *p, struct engine_kv_seq *seq)
{
    memset(seq, 0, sizeof *seq);
    seq->blocks = malloc(p->max_seq_blocks * sizeof *seq->blocks);
    if (!seq->blocks)
        return PW_ERR_NOMEM;
    seq->max_blocks = p->max_seq_blocks;
    return PW_OK;
}

void engine_kv_seq_reset(struct engine_kv_pool *p, struct engine_kv_seq *seq)
{
    for (uint32_t i = 0; i < seq->n_blocks; i++) {
        uint32_t b = seq->blocks[i];
        PW_ASSERT(p->refcount[b] > 0);
        if (--p->refcount[b] == 0)
            free_push(p, b, p->registered[b] ? LIST_CACHED : LIST_PLAIN);
    }
    seq->n_blocks = 0;
    seq->n_tokens = 0;
    seq->n_hashed = 0;
    seq->last_hash = 0;
}

void engine_kv_seq_deinit(struct engine_kv_pool *p, struct engine_kv_seq *seq)
{
    if (!seq->blocks)
        return;
    engine_kv_seq_reset(p, seq);
    free(seq->blocks);
    memset(seq, 0, sizeof *seq);
}

void engine_kv_seq_match_prefix(struct engine_kv_pool *p, struct engine_kv_seq *seq,
                                const int32_t *tokens, uint32_t n, uint32_t *n_cached)
{
    PW_ASSERT(seq->n_tokens == 0 && seq->n_blocks == 0);
    uint32_t bs = p->block_size;
    uint64_t parent = 0;
    uint32_t i = 0;
    p->lookup_tokens += n;
    /* Only blocks entirely before the last prompt token: that one must produce logits. */
    while (n > 0 && (uint64_t)(i + 1) * bs <= n - 1 && i < seq->max_blocks) {
        const int32_t *blk = tokens + (size_t)i * bs;
        uint64_t h = chain_hash(parent, blk, bs);
        uint32_t b = table_find(p, h, parent, blk);
        if (b == NIL)
            break;
        if (p->refcount[b]++ == 0)
            free_unlink(p, b);
        seq->blocks[seq->n_blocks++] = b;
        parent = h;
        i++;
    }
    seq->n_tokens = i * bs;
    seq->n_hashed = i;
    seq->last_hash = parent;
    p->hit_tokens += seq->n_tokens;
    *n_cached = seq->n_tokens;
}

uint32_t engine_kv_seq_blocks_needed(const struct engine_kv_pool *p,
                                     const struct engine_kv_seq *seq, uint32_t n_new)
{
    uint64_t want = ((uint64_t)seq->n_tokens + n_new + p->block_size - 1) / p->block_size;
    return want > seq->n_blocks ? (uint32_t)(want - seq->n_blocks) : 0;
}

enum pw_err engine_kv_seq_reserve(struct engine_kv_pool *p, struct engine_kv_seq *seq,
                                  uint32_t n_new)
{
    uint64_t want = ((uint64_t)seq->n_tokens + n_new + p->block_size - 1) / p->block_size;
    if (want > seq->max_blocks)
        return PW_ERR_RANGE;
    if (want <= seq->n_blocks)
        return PW_OK;
    uint32_t need = (uint32_t)(want - seq->n_blocks);
    if (need > p->n_free)
        return PW_ERR_AGAIN;
    for (uint32_t k = 0; k < need; k++) {
        uint32_t b = free_take(p);
        free_unlink(p, b);
        if (p->registered[b])
            table_remove(p, b); /* evicting a cached prefix block */
        p->refcount[b] = 1;
        seq->blocks[seq->n_blocks++] = b;
    }
    return PW_OK;
}

void engine_kv_seq_commit(struct engine_kv_pool *p, struct engine_kv_seq *seq,
                          const int32_t *tokens, uint32_t n_total)
{
    uint32_t bs = p->block_size;
    PW_ASSERT((uint64_t)n_total <= (uint64_t)seq->n_blocks * bs);
    seq->n_tokens = n_total;
    while ((uint64_t)(seq->n_hashed + 1) * bs <= n_total) {
        uint32_t b = seq->blocks[seq->n_hashed];
        const int32_t *blk = tokens + (size_t)seq->n_hashed * bs;
        uint64_t h = chain_hash(seq->last_hash, blk, bs);
        /* An identical block may already be registered (same prompt computed twice at once):
         * keep that one findable and leave ours private. */
        if (!p->registered[b] && table_find(p, h, seq->last_hash, blk) == NIL) {
            p->hash[b] = h;
            p->parent_hash[b] = seq->last_hash;
            memcpy(p->tokens + (size_t)b * bs, blk, bs * sizeof *blk);
            table_insert(p, b);
        }
        seq->last_hash = h;
        seq->n_hashed++;
    }
}
