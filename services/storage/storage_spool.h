/* SPDX-License-Identifier: ISC */
/*
 * storage_spool: the L2 spool file, an append-only log of opaque records
 * that stands in for PostgreSQL while it is down (storage_commit.c).
 *
 * Format: an 8-byte magic "TRSPOOL1", then records, each
 *
 *	u32 len (little endian) | u32 crc (CRC-32/IEEE of len's 4 bytes
 *	and the payload, little endian) | payload (len bytes)
 *
 * Appends are written at once and made durable by storage_spool_sync()
 * (one fdatasync per batch); a record counts only once synced.  Opening
 * scans the file and cuts a torn or corrupt tail (a crash mid-write: that
 * record was never acknowledged).  It never blocks on anything but the
 * local disk, and never reads a record it has not checked.
 */
#ifndef TROUPE_STORAGE_SPOOL_H
#define TROUPE_STORAGE_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define STORAGE_SPOOL_MAGIC "TRSPOOL1"
#define STORAGE_SPOOL_HDR 8     /* bytes of the magic */
#define STORAGE_SPOOL_REC_HDR 8 /* bytes before each payload */
#define STORAGE_SPOOL_REC_MAX (64u << 20)

struct storage_spool;

/* Open (creating it) the spool at path, bounded to max_bytes of file;
 * a torn tail is cut and its bytes counted in *dropped (may be NULL).
 * NULL with err filled on failure. */
struct storage_spool *storage_spool_open(const char *path, uint64_t max_bytes,
                                         uint64_t *dropped, char *err,
                                         size_t errlen);
/* Close the file (records stay on disk). */
void storage_spool_close(struct storage_spool *);
/* Append one record (not durable until storage_spool_sync); -1 with
 * errno ENOSPC if it would pass max_bytes, or on a write error (the
 * file is cut back to its previous end). */
int storage_spool_append(struct storage_spool *, const void *, size_t);
/* Make every append durable (one fdatasync); -1 on failure, and then
 * the appends since the last sync are cut off (none may be
 * acknowledged). */
int storage_spool_sync(struct storage_spool *);
/* Read the record at *off (0: the first) into out (reset first) and
 * move *off past it: 1, 0 at the end of the synced records, -1 on a
 * read error or a record that fails its check. */
int storage_spool_next(struct storage_spool *, uint64_t *off, struct buf *out);
/* The offset the next append goes to (storage_spool_next reads the
 * record there once synced). */
uint64_t storage_spool_tail(const struct storage_spool *);
/* Whether *off is at the end of the synced records. */
int storage_spool_at_end(const struct storage_spool *, uint64_t off);
/* Empty the spool (truncate to the magic, synced); -1 on failure. */
int storage_spool_clear(struct storage_spool *);
/* Bytes of synced records (without the magic). */
uint64_t storage_spool_bytes(const struct storage_spool *);
/* Number of synced records. */
uint64_t storage_spool_records(const struct storage_spool *);
/* fdatasync calls made by storage_spool_sync() so far. */
uint64_t storage_spool_syncs(const struct storage_spool *);
/* Change the bound (reload). */
void storage_spool_set_max(struct storage_spool *, uint64_t max_bytes);
/* CRC-32/IEEE (zlib's crc32) of n bytes, continuing from crc (0 to
 * start). */
uint32_t storage_spool_crc32(uint32_t crc, const void *, size_t n);

#endif
