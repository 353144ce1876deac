/* SPDX-License-Identifier: ISC */
/*
 * storage_spool_test: the L2 spool file format (storage_spool.c): append
 * and read back in order, one fdatasync per batch, unsynced appends
 * invisible, a torn or corrupt tail cut at reopen, the bound, clear.
 * Files live in a private mkdtemp directory.
 */
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

#include "storage_spool.h"
#include "t.h"

static char dir[64];
static char path[128];

static void
fresh(void)
{
	snprintf(dir, sizeof(dir), "/tmp/troupe-spool-XXXXXX");
	T_ASSERT(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/spool", dir);
}

static void
gone(void)
{
	unlink(path);
	rmdir(dir);
}

static struct storage_spool *
sp_open(uint64_t max, uint64_t *dropped)
{
	char err[256];
	struct storage_spool *sp =
	        storage_spool_open(path, max, dropped, err, sizeof(err));

	if (sp == NULL)
		T_FAIL("open: %s", err);
	return (sp);
}

static uint64_t
file_size(void)
{
	struct stat sb;

	T_ASSERT(stat(path, &sb) == 0);
	return ((uint64_t)sb.st_size);
}

static void
t_crc(void)
{
	/* The check value of CRC-32/IEEE. */
	T_EQ_INT(storage_spool_crc32(0, "123456789", 9), 0xcbf43926u);
	T_EQ_INT(storage_spool_crc32(storage_spool_crc32(0, "1234", 4),
	                             "56789", 5),
	         0xcbf43926u);
}

static void
t_append_order(void)
{
	struct storage_spool *sp;
	struct buf b = {0};
	uint64_t off = 0;
	char rec[32];
	int i;

	fresh();
	sp = sp_open(1 << 20, NULL);
	T_EQ_INT(storage_spool_bytes(sp), 0);
	T_EQ_INT(file_size(), STORAGE_SPOOL_HDR);
	for (i = 0; i < 50; i++) {
		snprintf(rec, sizeof(rec), "record %d", i);
		T_EQ_INT(storage_spool_append(sp, rec, strlen(rec)), 0);
	}
	T_EQ_INT(storage_spool_append(sp, "", 0), 0); /* empty is a record */
	/* Nothing visible before the sync. */
	T_EQ_INT(storage_spool_records(sp), 0);
	T_EQ_INT(storage_spool_next(sp, &off, &b), 0);
	T_EQ_INT(storage_spool_sync(sp), 0);
	T_EQ_INT(storage_spool_records(sp), 51);
	for (i = 0; i < 50; i++) {
		snprintf(rec, sizeof(rec), "record %d", i);
		T_EQ_INT(storage_spool_next(sp, &off, &b), 1);
		T_EQ_MEM(b.b, b.len, rec);
	}
	T_EQ_INT(storage_spool_next(sp, &off, &b), 1);
	T_EQ_INT(b.len, 0);
	T_EQ_INT(storage_spool_at_end(sp, off), 1);
	T_EQ_INT(storage_spool_next(sp, &off, &b), 0);
	T_EQ_INT(off, file_size());
	T_EQ_INT(storage_spool_bytes(sp), file_size() - STORAGE_SPOOL_HDR);
	buf_free(&b);
	storage_spool_close(sp);
	gone();
}

static void
t_sync_batching(void)
{
	struct storage_spool *sp;
	int i, j;

	fresh();
	sp = sp_open(1 << 20, NULL);
	for (j = 0; j < 3; j++) {
		for (i = 0; i < 100; i++)
			T_EQ_INT(storage_spool_append(sp, "abc", 3), 0);
		T_EQ_INT(storage_spool_sync(sp), 0);
	}
	/* One fdatasync per batch, none for an empty one. */
	T_EQ_INT(storage_spool_syncs(sp), 3);
	T_EQ_INT(storage_spool_sync(sp), 0);
	T_EQ_INT(storage_spool_syncs(sp), 3);
	T_EQ_INT(storage_spool_records(sp), 300);
	storage_spool_close(sp);
	gone();
}

static void
t_reopen(void)
{
	struct storage_spool *sp;
	struct buf b = {0};
	uint64_t off = 0, dropped = 99;

	fresh();
	sp = sp_open(1 << 20, NULL);
	T_EQ_INT(storage_spool_append(sp, "one", 3), 0);
	T_EQ_INT(storage_spool_append(sp, "two", 3), 0);
	T_EQ_INT(storage_spool_sync(sp), 0);
	storage_spool_close(sp);
	sp = sp_open(1 << 20, &dropped);
	T_EQ_INT(dropped, 0);
	T_EQ_INT(storage_spool_records(sp), 2);
	T_EQ_INT(storage_spool_next(sp, &off, &b), 1);
	T_EQ_MEM(b.b, b.len, "one");
	/* Appends after a reopen go behind the old records. */
	T_EQ_INT(storage_spool_append(sp, "three", 5), 0);
	T_EQ_INT(storage_spool_sync(sp), 0);
	T_EQ_INT(storage_spool_next(sp, &off, &b), 1);
	T_EQ_MEM(b.b, b.len, "two");
	T_EQ_INT(storage_spool_next(sp, &off, &b), 1);
	T_EQ_MEM(b.b, b.len, "three");
	T_EQ_INT(storage_spool_clear(sp), 0);
	T_EQ_INT(storage_spool_records(sp), 0);
	T_EQ_INT(file_size(), STORAGE_SPOOL_HDR);
	storage_spool_close(sp);
	sp = sp_open(1 << 20, &dropped);
	T_EQ_INT(storage_spool_records(sp), 0);
	buf_free(&b);
	storage_spool_close(sp);
	gone();
}

/* A crash mid-append: only part of the last record reached the file. */
static void
t_torn(void)
{
	struct storage_spool *sp;
	struct buf b = {0};
	uint64_t off = 0, dropped = 0, good;
	int fd;

	fresh();
	sp = sp_open(1 << 20, NULL);
	T_EQ_INT(storage_spool_append(sp, "kept", 4), 0);
	T_EQ_INT(storage_spool_sync(sp), 0);
	good = file_size();
	T_EQ_INT(storage_spool_append(sp, "torn record", 11), 0);
	T_EQ_INT(storage_spool_sync(sp), 0);
	storage_spool_close(sp);
	T_ASSERT(truncate(path, (off_t)(file_size() - 3)) == 0);
	sp = sp_open(1 << 20, &dropped);
	T_EQ_INT(dropped, STORAGE_SPOOL_REC_HDR + 11 - 3);
	T_EQ_INT(file_size(), good);
	T_EQ_INT(storage_spool_records(sp), 1);
	T_EQ_INT(storage_spool_next(sp, &off, &b), 1);
	T_EQ_MEM(b.b, b.len, "kept");
	T_EQ_INT(storage_spool_next(sp, &off, &b), 0);
	storage_spool_close(sp);

	/* Only a torn header (fewer than 8 bytes). */
	fd = open(path, O_WRONLY | O_APPEND);
	T_ASSERT(fd != -1);
	T_EQ_INT(write(fd, "\x05\x00", 2), 2);
	close(fd);
	sp = sp_open(1 << 20, &dropped);
	T_EQ_INT(dropped, 2);
	T_EQ_INT(storage_spool_records(sp), 1);
	storage_spool_close(sp);

	/* A flipped payload byte: the CRC catches it. */
	fd = open(path, O_RDWR);
	T_ASSERT(fd != -1);
	T_EQ_INT(pwrite(fd, "K", 1, STORAGE_SPOOL_HDR + STORAGE_SPOOL_REC_HDR),
	         1);
	close(fd);
	sp = sp_open(1 << 20, &dropped);
	T_EQ_INT(dropped, STORAGE_SPOOL_REC_HDR + 4);
	T_EQ_INT(storage_spool_records(sp), 0);
	T_EQ_INT(file_size(), STORAGE_SPOOL_HDR);
	buf_free(&b);
	storage_spool_close(sp);
	gone();
}

static void
t_bound(void)
{
	struct storage_spool *sp;
	char err[128];
	int fd;

	fresh();
	/* Magic + 2 records of 8 + 10 bytes. */
	sp = sp_open(STORAGE_SPOOL_HDR + 2 * (STORAGE_SPOOL_REC_HDR + 10),
	             NULL);
	T_EQ_INT(storage_spool_append(sp, "0123456789", 10), 0);
	T_EQ_INT(storage_spool_append(sp, "0123456789", 10), 0);
	errno = 0;
	T_EQ_INT(storage_spool_append(sp, "x", 1), -1);
	T_EQ_INT(errno, ENOSPC);
	T_EQ_INT(storage_spool_sync(sp), 0);
	T_EQ_INT(storage_spool_records(sp), 2);
	storage_spool_close(sp);
	gone();

	/* Not a spool file: refused, not overwritten. */
	fresh();
	fd = open(path, O_WRONLY | O_CREAT, 0600);
	T_EQ_INT(write(fd, "something else", 14), 14);
	close(fd);
	T_ASSERT(storage_spool_open(path, 1 << 20, NULL, err, sizeof(err)) ==
	         NULL);
	T_ASSERT(strstr(err, "bad magic") != NULL);
	T_EQ_INT(file_size(), 14);
	gone();
}

T_TESTS = {
        {"crc", t_crc},
        {"append_order", t_append_order},
        {"sync_batching", t_sync_batching},
        {"reopen", t_reopen},
        {"torn", t_torn},
        {"bound", t_bound},
        {NULL, NULL},
};
T_MAIN
