/* SPDX-License-Identifier: ISC */
/*
 * storage_spool: the L2 spool file (format in storage_spool.h).  Plain
 * write/pread/fdatasync on one descriptor; the file is only ever
 * appended to, cut back to a known record boundary, or emptied.
 *
 * Callers: storage_commit.c (append + sync per batch while PostgreSQL is
 * down, replay when it is back), storage.c (open at start), the unit test
 * tests/unit/services/storage/storage_spool_test.c.  It must never hand
 * out a record that fails its length or CRC check, and never report a
 * record as stored before storage_spool_sync() has returned 0.
 *
 * DIAGNOSTICS: none; the caller logs (a cut tail is reported through
 * storage_spool_open's dropped count).
 */
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage_spool.h"

struct storage_spool {
	int fd;
	uint64_t max;
	uint64_t end;   /* end of the synced records */
	uint64_t wend;  /* end of what was written (>= end) */
	uint64_t nrec;  /* synced records */
	uint64_t nwrec; /* written records */
	uint64_t nsync; /* fdatasync calls by storage_spool_sync */
};

static uint32_t crc_tab[256];

uint32_t
storage_spool_crc32(uint32_t crc, const void *p, size_t n)
{
	const unsigned char *s = p;
	uint32_t c;
	size_t i;
	int k;

	if (crc_tab[1] == 0)
		for (i = 0; i < 256; i++) {
			c = (uint32_t)i;
			for (k = 0; k < 8; k++)
				c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
			crc_tab[i] = c;
		}
	crc = ~crc;
	for (i = 0; i < n; i++)
		crc = crc_tab[(crc ^ s[i]) & 0xff] ^ (crc >> 8);
	return (~crc);
}

static void
le32_put(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)v;
	p[1] = (unsigned char)(v >> 8);
	p[2] = (unsigned char)(v >> 16);
	p[3] = (unsigned char)(v >> 24);
}

static uint32_t
le32_get(const unsigned char *p)
{
	return ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	        (uint32_t)p[3] << 24);
}

static int
pread_all(int fd, void *p, size_t n, uint64_t off)
{
	ssize_t r;
	size_t got = 0;

	while (got < n) {
		r = pread(fd, (char *)p + got, n - got, (off_t)(off + got));
		if (r == -1 && errno == EINTR)
			continue;
		if (r <= 0)
			return (-1);
		got += (size_t)r;
	}
	return (0);
}

static int
pwrite_all(int fd, const void *p, size_t n, uint64_t off)
{
	ssize_t r;
	size_t put = 0;

	while (put < n) {
		r = pwrite(fd, (const char *)p + put, n - put,
		           (off_t)(off + put));
		if (r == -1 && errno == EINTR)
			continue;
		if (r <= 0)
			return (-1);
		put += (size_t)r;
	}
	return (0);
}

/* Check the record at off of a file of size bytes; its payload length,
 * or -1 if it is torn or corrupt.  The payload is read into b. */
static int64_t
rec_check(int fd, uint64_t off, uint64_t size, struct buf *b)
{
	unsigned char h[STORAGE_SPOOL_REC_HDR];
	uint32_t len, crc;

	if (size - off < STORAGE_SPOOL_REC_HDR ||
	    pread_all(fd, h, sizeof(h), off) == -1)
		return (-1);
	len = le32_get(h);
	crc = le32_get(h + 4);
	if (len > STORAGE_SPOOL_REC_MAX ||
	    size - off - STORAGE_SPOOL_REC_HDR < len)
		return (-1);
	buf_reset(b);
	if (buf_reserve(b, len + 1) == -1 ||
	    pread_all(fd, b->b, len, off + STORAGE_SPOOL_REC_HDR) == -1)
		return (-1);
	b->len = len;
	if (storage_spool_crc32(storage_spool_crc32(0, h, 4), b->b, len) !=
	    crc)
		return (-1);
	return (len);
}

struct storage_spool *
storage_spool_open(const char *path, uint64_t max_bytes, uint64_t *dropped,
                   char *err, size_t errlen)
{
	struct storage_spool *sp;
	struct stat sb;
	struct buf b = {0};
	char magic[STORAGE_SPOOL_HDR];
	uint64_t off, size;
	int64_t n;

	if (dropped != NULL)
		*dropped = 0;
	if ((sp = calloc(1, sizeof(*sp))) == NULL) {
		snprintf(err, errlen, "out of memory");
		return (NULL);
	}
	sp->max = max_bytes;
	if ((sp->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) == -1 ||
	    fstat(sp->fd, &sb) == -1) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		goto fail;
	}
	size = (uint64_t)sb.st_size;
	if (size < STORAGE_SPOOL_HDR) {
		/* New (or torn before its magic was synced). */
		if (ftruncate(sp->fd, 0) == -1 ||
		    pwrite_all(sp->fd, STORAGE_SPOOL_MAGIC, STORAGE_SPOOL_HDR,
		               0) == -1 ||
		    fdatasync(sp->fd) == -1) {
			snprintf(err, errlen, "%s: %s", path, strerror(errno));
			goto fail;
		}
		size = STORAGE_SPOOL_HDR;
	} else if (pread_all(sp->fd, magic, sizeof(magic), 0) == -1 ||
	           memcmp(magic, STORAGE_SPOOL_MAGIC, sizeof(magic)) != 0) {
		snprintf(err, errlen, "%s: not a spool file (bad magic)",
		         path);
		goto fail;
	}
	off = STORAGE_SPOOL_HDR;
	while (off < size) {
		if ((n = rec_check(sp->fd, off, size, &b)) == -1)
			break;
		off += STORAGE_SPOOL_REC_HDR + (uint64_t)n;
		sp->nrec++;
	}
	buf_free(&b);
	if (off < size) {
		/* A torn or corrupt tail: never acknowledged, cut it. */
		if (ftruncate(sp->fd, (off_t)off) == -1 ||
		    fdatasync(sp->fd) == -1) {
			snprintf(err, errlen, "%s: cutting a torn tail: %s",
			         path, strerror(errno));
			goto fail;
		}
		if (dropped != NULL)
			*dropped = size - off;
	}
	sp->end = sp->wend = off;
	sp->nwrec = sp->nrec;
	return (sp);
fail:
	buf_free(&b);
	if (sp->fd != -1)
		close(sp->fd);
	free(sp);
	return (NULL);
}

void
storage_spool_close(struct storage_spool *sp)
{
	if (sp == NULL)
		return;
	close(sp->fd);
	free(sp);
}

int
storage_spool_append(struct storage_spool *sp, const void *p, size_t n)
{
	unsigned char h[STORAGE_SPOOL_REC_HDR];
	int save;

	if (n > STORAGE_SPOOL_REC_MAX ||
	    sp->wend + STORAGE_SPOOL_REC_HDR + n > sp->max) {
		errno = ENOSPC;
		return (-1);
	}
	le32_put(h, (uint32_t)n);
	le32_put(h + 4,
	         storage_spool_crc32(storage_spool_crc32(0, h, 4), p, n));
	if (pwrite_all(sp->fd, h, sizeof(h), sp->wend) == -1 ||
	    pwrite_all(sp->fd, p, n, sp->wend + sizeof(h)) == -1) {
		save = errno;
		(void)ftruncate(sp->fd, (off_t)sp->wend);
		errno = save;
		return (-1);
	}
	sp->wend += sizeof(h) + n;
	sp->nwrec++;
	return (0);
}

int
storage_spool_sync(struct storage_spool *sp)
{
	int save;

	if (sp->wend == sp->end)
		return (0);
	sp->nsync++;
	if (fdatasync(sp->fd) == -1) {
		save = errno;
		(void)ftruncate(sp->fd, (off_t)sp->end);
		sp->wend = sp->end;
		sp->nwrec = sp->nrec;
		errno = save;
		return (-1);
	}
	sp->end = sp->wend;
	sp->nrec = sp->nwrec;
	return (0);
}

int
storage_spool_next(struct storage_spool *sp, uint64_t *off, struct buf *out)
{
	int64_t n;

	if (*off < STORAGE_SPOOL_HDR)
		*off = STORAGE_SPOOL_HDR;
	if (*off >= sp->end)
		return (0);
	if ((n = rec_check(sp->fd, *off, sp->end, out)) == -1)
		return (-1);
	*off += STORAGE_SPOOL_REC_HDR + (uint64_t)n;
	return (1);
}

uint64_t
storage_spool_tail(const struct storage_spool *sp)
{
	return (sp->wend);
}

int
storage_spool_at_end(const struct storage_spool *sp, uint64_t off)
{
	return (off >= sp->end || sp->end <= STORAGE_SPOOL_HDR);
}

int
storage_spool_clear(struct storage_spool *sp)
{
	if (ftruncate(sp->fd, STORAGE_SPOOL_HDR) == -1 ||
	    fdatasync(sp->fd) == -1)
		return (-1);
	sp->end = sp->wend = STORAGE_SPOOL_HDR;
	sp->nrec = sp->nwrec = 0;
	return (0);
}

uint64_t
storage_spool_bytes(const struct storage_spool *sp)
{
	return (sp->end - STORAGE_SPOOL_HDR);
}

uint64_t
storage_spool_records(const struct storage_spool *sp)
{
	return (sp->nrec);
}

uint64_t
storage_spool_syncs(const struct storage_spool *sp)
{
	return (sp->nsync);
}

void
storage_spool_set_max(struct storage_spool *sp, uint64_t max_bytes)
{
	sp->max = max_bytes;
}
