/* SPDX-License-Identifier: ISC */
/*
 * fuzz_conf: the INI configuration file every service reads
 * (common/conf.c), given as the bytes of a file.  Properties: a file
 * that loads answers lookups; one that does not gives a reason.
 */
#include <sys/mman.h>
#include <unistd.h>

#include "conf.h"
#include "fuzz.h"

int
LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
	char path[64], err[256];
	int64_t v;
	int fd;

	if ((fd = memfd_create("fuzz-conf", 0)) == -1)
		return (0);
	if (n > 0 && write(fd, d, n) != (ssize_t)n) {
		close(fd);
		return (0);
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	err[0] = '\0';
	if (conf_load(path, 0, err, sizeof(err)) == 0) {
		(void)conf_get("edge", "listen", "127.0.0.1:8080");
		(void)conf_get("storage", "redis", NULL);
		(void)conf_get_int("dispatcher", "workers_max", 50, 1, 256, &v,
		                   err, sizeof(err));
	} else
		fuzz_assert(err[0] != '\0');
	conf_free();
	close(fd);
	return (0);
}
