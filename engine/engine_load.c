/*
 * engine_load: brings a parkway-engine from nothing to ready: backend, model (GGUF
 * mapped, weights registered, buffers and KV cache allocated), tokenizer, chat template,
 * scheduler. Everything the serving loop needs is allocated here, once.
 */
#include <stdio.h>
#include <string.h>

#include "engine.h"
#include "engine_chat.h"
#include "engine_model.h"
#include "engine_tokenizer.h"
#include "kernel.h"
#include "kernel_cuda_plugin.h"
#include "pw_clock.h"
#include "pw_log.h"

/* CUDA when the function asks for a GPU and one is present; else the CPU, saying why. The
 * CUDA backend is a module loaded only here (kernels/kernel_cuda_plugin.h). */
static enum pw_err backend_create(const struct engine_opts *o, struct kernel_backend **be)
{
    if (o->gpu) {
        char why[512];
        const struct kernel_cuda_plugin *cuda = kernel_cuda_plugin_load(why, sizeof why);
        if (cuda && cuda->device_count() > 0)
            return cuda->create(NULL, be);
        if (cuda)
            PW_LOG_WARN("event=engine_backend backend=cpu reason=no_cuda_device gpu_requested=1");
        else
            PW_LOG_WARN("event=engine_backend backend=cpu reason=no_cuda_module gpu_requested=1 "
                        "detail=\"%s\"",
                        why);
    }
    return kernel_cpu_create(o->threads, be);
}

enum pw_err engine_load(struct engine *e, const struct engine_sched_cb *cb, char *err,
                        size_t errcap)
{
    uint64_t t0 = pw_clock_mono_ns();
    const struct engine_opts *o = &e->opts;
    enum pw_err rc = backend_create(o, &e->be);
    if (rc) {
        snprintf(err, errcap, "cannot create the compute backend: %s", pw_err_desc(rc));
        return rc;
    }
    struct engine_model_opts mo = {
        .max_tok = o->max_tok,
        .max_logits = o->max_batch,
        .n_ctx = o->n_ctx,
        .block_tokens = 16,
        .n_kv_blocks = o->n_kv_blocks,
        .kv_mem_fraction = o->kv_mem_fraction,
    };
    if ((rc = engine_model_load(o->model_path, e->be, &mo, &e->model, err, errcap)))
        return rc;
    const struct engine_gguf *g = engine_model_gguf(e->model);
    if ((rc = engine_tokenizer_from_gguf(g, NULL, &e->tok, err, errcap)))
        return rc;
    if (engine_tokenizer_n_vocab(e->tok) < engine_model_hparams(e->model)->n_vocab) {
        snprintf(err, errcap, "model: the vocabulary has %u tokens but the embedding has %u rows",
                 engine_tokenizer_n_vocab(e->tok), engine_model_hparams(e->model)->n_vocab);
        return PW_ERR_PARSE;
    }
    if ((rc = engine_chat_from_gguf(g, e->tok, o->chat_template, &e->chat, err, errcap)))
        return rc;
    struct engine_sched_opts so = {.max_batch = o->max_batch, .max_tok = o->max_tok};
    if ((rc = engine_sched_create(e->model, e->tok, &so, cb, &e->sched))) {
        snprintf(err, errcap, "cannot create the scheduler: %s", pw_err_desc(rc));
        return rc;
    }
    e->load_ns = pw_clock_mono_ns() - t0;
    const struct engine_hparams *hp = engine_model_hparams(e->model);
    PW_LOG_INFO("event=engine_ready backend=%s layers=%u embd=%u vocab=%u ctx=%u weights=%s "
                "kv_mib=%zu load_ms=%.1f",
                e->be->ops->name(e->be), hp->n_layer, hp->n_embd, hp->n_vocab,
                engine_model_opts(e->model)->n_ctx, kernel_dtype_name(hp->weight_type),
                engine_model_kv_bytes(e->model) >> 20, (double)e->load_ns / 1e6);
    return PW_OK;
}

void engine_unload(struct engine *e)
{
    engine_sched_destroy(e->sched);
    e->sched = NULL;
    engine_chat_destroy(e->chat);
    e->chat = NULL;
    engine_tokenizer_destroy(e->tok);
    e->tok = NULL;
    engine_model_destroy(e->model);
    e->model = NULL;
    if (e->be)
        e->be->ops->destroy(e->be);
    e->be = NULL;
}
