/*
 * pw_storage: where uploaded files and batch outputs live, behind a small interface so a
 * shared filesystem or an object store can be added beside the local directory.
 *
 * Objects are named by an id that is a safe key name (pw_key_name_ok: [A-Za-z0-9._-],
 * 1..128 bytes), e.g. "file-3f2a...". Writes are atomic: a writer streams into a temporary
 * object and commit() publishes it under its id in one step (a crash never leaves half a
 * file under the id), so writing the same id twice simply replaces it (idempotent retries).
 * Reads stream in pieces, or take the whole object up to a cap.
 *
 * Implementations: "local" (a directory; the default). An object store would add a file
 * pw_storage_<name>.c with its own struct pw_storage_ops and a URL scheme in
 * pw_storage_open().
 *
 * Threading: a struct pw_storage may be used from several threads at once (the local
 * implementation keeps no mutable state); a reader or writer belongs to one thread. Calls
 * block (disk I/O): event loops call them only for short local operations.
 */
#ifndef PW_STORAGE_H
#define PW_STORAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

struct pw_storage;
struct pw_storage_reader;
struct pw_storage_writer;

/* One implementation. Every function returns PW_OK or an error; NOTFOUND for a missing id. */
struct pw_storage_ops {
    const char *name;
    enum pw_err (*writer_open)(struct pw_storage *s, const char *id,
                               struct pw_storage_writer **out);
    enum pw_err (*write)(struct pw_storage_writer *wr, const void *data, size_t len);
    enum pw_err (*commit)(struct pw_storage_writer *wr); /* publishes and frees */
    void (*abort)(struct pw_storage_writer *wr);         /* discards and frees */
    enum pw_err (*reader_open)(struct pw_storage *s, const char *id, uint64_t *size_out,
                               struct pw_storage_reader **out);
    enum pw_err (*read)(struct pw_storage_reader *rd, void *buf, size_t cap, size_t *n_out);
    void (*reader_close)(struct pw_storage_reader *rd);
    enum pw_err (*remove)(struct pw_storage *s, const char *id);
    void (*destroy)(struct pw_storage *s);
    /* Optional (NULL: PW_ERR_UNSUPPORTED): up to cap bytes at off, without moving the
     * reader's sequential position; *n_out < cap only at the end of the object. */
    enum pw_err (*read_at)(struct pw_storage_reader *rd, uint64_t off, void *buf, size_t cap,
                           size_t *n_out);
};

struct pw_storage {
    const struct pw_storage_ops *ops;
    void *impl; /* owned by the implementation */
};

/*
 * Opens storage at where: "file:///abs/dir", or a plain directory path (local). The
 * directory is created (mode 0700, parents too) when missing. On failure writes a reason
 * into err. *out is freed with pw_storage_destroy().
 */
enum pw_err pw_storage_open(const char *where, struct pw_storage **out, char *err, size_t errcap);

/* NULL is a no-op. */
void pw_storage_destroy(struct pw_storage *s);

/* Streaming write: open, write any number of times, then exactly one of commit or abort. */
enum pw_err pw_storage_writer_open(struct pw_storage *s, const char *id,
                                   struct pw_storage_writer **out);
enum pw_err pw_storage_write(struct pw_storage_writer *wr, const void *data, size_t len);
enum pw_err pw_storage_commit(struct pw_storage_writer *wr);
void pw_storage_abort(struct pw_storage_writer *wr); /* NULL is a no-op */

/* The whole object in one call (writer_open + write + commit). */
enum pw_err pw_storage_put(struct pw_storage *s, const char *id, const void *data, size_t len);

/* Streaming read; *n_out == 0 at the end. size_out (may be NULL) gets the object's size. */
enum pw_err pw_storage_reader_open(struct pw_storage *s, const char *id, uint64_t *size_out,
                                   struct pw_storage_reader **out);
enum pw_err pw_storage_read(struct pw_storage_reader *rd, void *buf, size_t cap, size_t *n_out);
void pw_storage_reader_close(struct pw_storage_reader *rd); /* NULL is a no-op */

/*
 * Random access on an open reader: up to cap bytes starting at byte off (fewer only at the
 * end of the object; 0 past it). Does not move the sequential position of
 * pw_storage_read(). The reader keeps seeing the object it opened, even if the id is
 * replaced or deleted meanwhile (local: an open descriptor). PW_ERR_UNSUPPORTED when the
 * implementation has no random access.
 */
enum pw_err pw_storage_read_at(struct pw_storage_reader *rd, uint64_t off, void *buf, size_t cap,
                               size_t *n_out);

/*
 * The whole object, malloc'd and NUL-terminated (free()); *len_out its length. An object
 * larger than max bytes gives PW_ERR_TOOBIG before anything is allocated.
 */
enum pw_err pw_storage_get(struct pw_storage *s, const char *id, size_t max, char **out,
                           size_t *len_out);

/* Removes the object; a missing one gives PW_ERR_NOTFOUND. */
enum pw_err pw_storage_delete(struct pw_storage *s, const char *id);

/* The local-directory implementation directly (pw_storage_open picks it for paths). */
enum pw_err pw_storage_local_create(const char *dir, struct pw_storage **out, char *err,
                                    size_t errcap);

#endif
