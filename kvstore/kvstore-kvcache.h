/*
 * kvstore-kvcache.h — bridge between a model's per-layer "row" KV cache and kvstore blocks.
 *
 * A model context keeps, for every layer, two arrays of rows indexed by token position: row t
 * holds the n_kv_heads*head_dim elements of token t's key (or value), heads one after the
 * other ([token][kv_head][head_dim]), as F16 or F32. A kvstore block holds the K and V of one
 * layer for tokens_per_block consecutive tokens in the layout [K|V][kv_head][token][head_dim],
 * in the segment's dtype (F32, F16 or BF16). These functions convert between the two, one
 * layer and a run of tokens at a time; they know nothing about models (no model header): the
 * caller passes pointers to its rows and their element type.
 *
 * Token ranges need not be aligned to blocks: a store that starts or ends inside a token
 * block reads the block back (kvstore_block_alloc finds the block again), writes only the
 * tokens in range and leaves the others as they were (zero when the block is new). A load
 * copies out exactly the tokens asked for.
 *
 * Pointers: `k_rows` / `v_rows` point at the row of token tok0 (not of token 0); row i of the
 * run is at byte offset i*row_stride, and each row holds at least n_kv_heads*head_dim
 * elements of elem_type. Values are converted (F32 <-> F16/BF16) when types differ; the
 * conversion is exact when the row type and the segment dtype are equal.
 *
 * Errors: 0 / negative code like kvstore.h (-EINVAL for bad arguments or types,
 * -KVSTORE_* from the store), with the reason in err when it is non-NULL.
 * Threads: like kvstore.h; no global state. Scratch memory is allocated per call.
 */
#ifndef KVSTORE_KVCACHE_H
#define KVSTORE_KVCACHE_H

#include "kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Row element types accepted (same numbering as enum kvstore_dtype / tn_type): F32 and F16.
 * BF16 rows are accepted too. */

/* Bytes of one row's payload: n_kv_heads * head_dim * sizeof(elem_type); 0 for a bad type. */
CM_API size_t kvstore_kvcache_row_bytes(const kvstore_geometry *g, uint32_t elem_type);

/* Write tokens [tok0, tok0+n_tok) of `layer` from the rows into the WRITING sequence `seq`
 * of this process (blocks allocated as needed; partial token blocks read-modify-write).
 * Token blocks shared from a prefix are read-only: storing into them gives -KVSTORE_ESTATE,
 * so start at the end of the adopted prefix. */
CM_API int kvstore_kvcache_store(kvstore *kv, kvstore_seq_ref seq, uint32_t layer,
                                 const void *k_rows, const void *v_rows, size_t row_stride,
                                 uint32_t elem_type, uint32_t tok0, uint32_t n_tok, cm_err *err);

/* Read tokens [tok0, tok0+n_tok) of `layer` of the leased READY sequence into the rows
 * (row i = token tok0+i). The caller checks that the range is within the sequence's tokens
 * (kvstore_seq_get_info n_tokens); blocks past the manifest give an error from the store. */
CM_API int kvstore_kvcache_load(kvstore *kv, const kvstore_lease *lease, uint32_t layer,
                                uint32_t tok0, uint32_t n_tok, void *k_rows, void *v_rows,
                                size_t row_stride, uint32_t elem_type, cm_err *err);

/* The pure conversions, for callers that move blocks themselves (e.g. through the pager).
 * `block` is one kvstore block (g->bytes_per_block bytes, geometry g); tokens
 * [t0, t0+n) within the block (t0 + n <= tokens_per_block) go to/from rows as above.
 * Return 0 or -EINVAL. */
CM_API int kvstore_kvcache_block_to_rows(const kvstore_geometry *g, const void *block,
                                         uint32_t t0, uint32_t n, void *k_rows, void *v_rows,
                                         size_t row_stride, uint32_t elem_type);
CM_API int kvstore_kvcache_rows_to_block(const kvstore_geometry *g, void *block, uint32_t t0,
                                         uint32_t n, const void *k_rows, const void *v_rows,
                                         size_t row_stride, uint32_t elem_type);

/* ---- model fingerprint ------------------------------------------------------------------- */

/* The fingerprint every worker of a node computes for a model file, so that they agree on the
 * kvstore geometry's model_fingerprint (and on ModelInfo.fingerprint, printed "%016" PRIx64):
 * FNV-1a 64 over the file size (8 bytes, little-endian), the first 8 MiB (the GGUF header:
 * metadata, tokenizer, tensor table) and the last 1 MiB of the file (weights). Never 0.
 * Returns 0, or -errno (cannot open/read) with err set. Reads at most 9 MiB. */
CM_API int kvstore_model_fingerprint(const char *path, uint64_t *out, cm_err *err);

#ifdef __cplusplus
}
#endif
#endif /* KVSTORE_KVCACHE_H */
