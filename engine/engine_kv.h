/*
 * engine_kv: bookkeeping of the paged KV cache (which block holds which tokens), with
 * prefix reuse. The K/V numbers themselves live in the backend's buffers, indexed by the
 * block ids handed out here; this module never touches them.
 *
 *   pool:  n_blocks blocks of block_size token slots each, shared by all sequences.
 *   seq:   a block table (block ids in token order) and a token count; token t of the
 *          sequence lives in block table[t / block_size], slot t % block_size.
 *
 * Prefix reuse (as vLLM's automatic prefix caching): every FULL block gets a hash chained
 * from its parent block's hash and its own token ids. A new sequence whose prompt starts
 * with the same full blocks maps those blocks (refcount + 1) instead of computing them.
 * Blocks whose refcount drops to 0 keep their content and stay findable until they are
 * reused, oldest-freed first. A block is only written by the one sequence that filled it
 * (shared blocks are always full), so no copy-on-write is needed.
 *
 * Not thread-safe: owned by the engine's scheduler thread. Allocates only at create.
 */
#ifndef ENGINE_KV_H
#define ENGINE_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

struct engine_kv_pool;

/* A sequence's view of the pool; caller-owned, _init/_deinit. */
struct engine_kv_seq {
    uint32_t *blocks;  /* block table, owned; capacity max_blocks */
    uint32_t n_blocks; /* blocks in use */
    uint32_t max_blocks;
    uint32_t n_tokens;  /* tokens whose KV is (or is being) in the blocks */
    uint32_t n_hashed;  /* leading full blocks already registered for reuse */
    uint64_t last_hash; /* chain hash of block n_hashed - 1 (0 for none) */
};

/*
 * Creates a pool of n_blocks blocks of block_size tokens; max_seq_tokens bounds one
 * sequence (the context length). Returns PW_ERR_INVAL for zero sizes, PW_ERR_NOMEM.
 */
enum pw_err engine_kv_pool_create(uint32_t n_blocks, uint32_t block_size, uint32_t max_seq_tokens,
                                  struct engine_kv_pool **out);
void engine_kv_pool_destroy(struct engine_kv_pool *pool);

uint32_t engine_kv_pool_block_size(const struct engine_kv_pool *pool);
uint32_t engine_kv_pool_n_blocks(const struct engine_kv_pool *pool);
/* Blocks not referenced by any sequence (cached or empty). */
uint32_t engine_kv_pool_n_free(const struct engine_kv_pool *pool);
/* Cumulative prompt tokens served from the prefix cache, and looked up. */
uint64_t engine_kv_pool_hit_tokens(const struct engine_kv_pool *pool);
uint64_t engine_kv_pool_lookup_tokens(const struct engine_kv_pool *pool);

enum pw_err engine_kv_seq_init(struct engine_kv_pool *pool, struct engine_kv_seq *seq);
/* Releases the sequence's blocks (if any) and frees its table. */
void engine_kv_seq_deinit(struct engine_kv_pool *pool, struct engine_kv_seq *seq);

/*
 * For a sequence with no tokens yet: maps the longest run of cached full blocks matching
 * tokens[0..n) and sets seq->n_tokens to the tokens covered (a multiple of block_size, at
 * most n - 1 so the last prompt token is always computed and yields logits). Returns that
 * count through *n_cached.
 */
void engine_kv_seq_match_prefix(struct engine_kv_pool *pool, struct engine_kv_seq *seq,
                                const int32_t *tokens, uint32_t n, uint32_t *n_cached);

/*
 * Makes room for n_new more tokens after seq->n_tokens, taking free blocks (evicting
 * cached ones, least recently freed first). PW_ERR_AGAIN if the pool has too few free
 * blocks (nothing changes; the scheduler preempts someone); PW_ERR_RANGE past the
 * sequence limit. Does not advance n_tokens.
 */
enum pw_err engine_kv_seq_reserve(struct engine_kv_pool *pool, struct engine_kv_seq *seq,
                                  uint32_t n_new);

/* Blocks that engine_kv_seq_reserve(seq, n_new) would have to take from the free list. */
uint32_t engine_kv_seq_blocks_needed(const struct engine_kv_pool *pool,
                                     const struct engine_kv_seq *seq, uint32_t n_new);

/*
 * Records that the KV of tokens[0..n_total) is now written (n_total <= reserved room);
 * full blocks not yet registered become reusable by later prompts. tokens is the whole
 * sequence so far (prompt and generated).
 */
void engine_kv_seq_commit(struct engine_kv_pool *pool, struct engine_kv_seq *seq,
                          const int32_t *tokens, uint32_t n_total);

/* Releases every block (preemption or end of request); the table stays allocated. */
void engine_kv_seq_reset(struct engine_kv_pool *pool, struct engine_kv_seq *seq);

/* Slot of token position pos: block id and offset. pos < reserved room. */
static inline uint32_t engine_kv_seq_slot(const struct engine_kv_seq *seq, uint32_t block_size,
                                          uint32_t pos)
{
    return seq->blocks[pos / block_size] * block_size + pos % block_size;
}

#endif
