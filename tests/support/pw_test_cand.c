/* pw_test_cand: see pw_test_cand.h. */
#include "pw_test_cand.h"

#include <math.h>
#include <stdlib.h>

static const float *cand_row; /* qsort's context: the tests run one at a time */

static int cand_cmp(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    float x = isnan(cand_row[i]) ? -INFINITY : cand_row[i];
    float y = isnan(cand_row[j]) ? -INFINITY : cand_row[j];
    if (x != y) /* -0 == +0 here */
        return x > y ? -1 : 1;
    return i < j ? -1 : i > j;
}

void pw_test_candidate_order(const float *row, int32_t n, int32_t *order)
{
    for (int32_t i = 0; i < n; i++)
        order[i] = i;
    cand_row = row;
    qsort(order, (size_t)n, sizeof(int32_t), cand_cmp);
}
