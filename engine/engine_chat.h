/*
 * engine_chat: chat templates, rendered straight to token ids.
 *
 * There is no Jinja interpreter. The family of a model's template is recognised from
 * tokenizer.chat_template by distinctive markers (<|im_start|> ChatML, <|start_header_id|>
 * Llama 3, <<SYS>> Llama 2, [INST] Mistral, <|user|> Zephyr), or named by the function
 * spec; each family's rendering is written out here, equal to the Hugging Face template
 * of that family. Unknown templates render as ChatML after one warning.
 *
 * Injection-safe: the template's own markers become their special token ids (when the
 * vocabulary has them as control/user-defined tokens; otherwise they are text), while
 * message contents are always encoded as plain text, so a user who types "<|im_end|>"
 * gets those characters, never the token. The text between two markers is tokenized as
 * one string, as Hugging Face tokenizes the rendered template.
 *
 * ChatML templates that inject a default system message when the conversation has none
 * (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face") have
 * that message extracted from the template text and injected the same way.
 *
 * A chat object is immutable after create; render may run on many threads.
 */
#ifndef ENGINE_CHAT_H
#define ENGINE_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine_tokenizer.h"
#include "pw_err.h"

struct engine_gguf;

#define ENGINE_CHAT_MAX_MESSAGES 4096u /* messages per render */
#define ENGINE_CHAT_MAX_SYSTEM 4096u   /* bytes of an extracted default system prompt */

enum engine_chat_family {
    ENGINE_CHAT_CHATML = 0,  /* <|im_start|>role\n ... <|im_end|>\n */
    ENGINE_CHAT_LLAMA2 = 1,  /* <s>[INST] <<SYS>>\n..\n<</SYS>>\n\n.. [/INST] .. </s> */
    ENGINE_CHAT_LLAMA3 = 2,  /* <|start_header_id|>role<|end_header_id|>\n\n..<|eot_id|> */
    ENGINE_CHAT_MISTRAL = 3, /* <s>[INST] .. [/INST]..</s>, system folded into first user */
    ENGINE_CHAT_ZEPHYR = 4,  /* <|role|>\n..</s>\n */
};

/* One message. role is "system", "user" or "assistant" (NUL-terminated); content is
 * content_len bytes (any bytes). All borrowed for the duration of the call. */
struct engine_chat_msg {
    const char *role;
    const char *content;
    size_t content_len;
};

struct engine_chat;

/* "chatml", "llama2", "llama3", "mistral", "zephyr". */
const char *engine_chat_family_name(enum engine_chat_family f);
bool engine_chat_family_parse(const char *name, enum engine_chat_family *out);

/* The family whose markers tmpl[0..len) has; false (and ChatML) when none. */
bool engine_chat_detect(const char *tmpl, size_t len, enum engine_chat_family *out);

/*
 * Builds a chat renderer. tmpl (may be NULL/0) is the model's template text; override
 * (may be NULL) names a family and wins over detection (PW_ERR_CONFIG if unknown). An
 * unrecognised or absent template gives ChatML and one PW_LOG_WARN. tok is borrowed for
 * create only (marker lookups). *out is owned by the caller: engine_chat_destroy().
 */
enum pw_err engine_chat_create(const struct engine_tokenizer *tok, const char *tmpl,
                               size_t tmpl_len, const char *override, struct engine_chat **out,
                               char *errbuf, size_t errcap);

/* engine_chat_create() over tokenizer.chat_template of g (absent = ChatML + warning). */
enum pw_err engine_chat_from_gguf(const struct engine_gguf *g, const struct engine_tokenizer *tok,
                                  const char *override, struct engine_chat **out, char *errbuf,
                                  size_t errcap);

void engine_chat_destroy(struct engine_chat *c);

enum engine_chat_family engine_chat_family(const struct engine_chat *c);

/* The default system prompt injected when a conversation has none ({NULL, 0} if none). */
struct engine_tok_str engine_chat_default_system(const struct engine_chat *c);

/*
 * Renders msgs (n >= 0) and, if add_generation_prompt, the assistant header, into
 * ids[0..cap); *n_out gets the count. tok must be the tokenizer the chat was created
 * with. PW_ERR_INVAL for an unknown role, a system message not first, or more than
 * ENGINE_CHAT_MAX_MESSAGES; PW_ERR_TOOBIG when the result passes cap or the text passes
 * ENGINE_TOK_MAX_INPUT; PW_ERR_NOMEM. errbuf (may be NULL) gets one line.
 */
enum pw_err engine_chat_render(const struct engine_chat *c, const struct engine_tokenizer *tok,
                               const struct engine_chat_msg *msgs, size_t n,
                               bool add_generation_prompt, int32_t *ids, size_t cap, size_t *n_out,
                               char *errbuf, size_t errcap);

#endif
