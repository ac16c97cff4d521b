/*
 * pw_test_cand: the order in which a sampler ranks logits (NaN as -inf, -0 equal to +0,
 * higher first, lower id first on ties), for tests that build the candidates a backend's
 * ops->topk would return and compare them with whole-row sampling.
 */
#ifndef PW_TEST_CAND_H
#define PW_TEST_CAND_H

#include <stdint.h>

/* order[0..n) = the ids 0..n-1 of row, best first. Not reentrant (qsort's context). */
void pw_test_candidate_order(const float *row, int32_t n, int32_t *order);

#endif
