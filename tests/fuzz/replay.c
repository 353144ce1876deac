/* SPDX-License-Identifier: ISC */
/*
 * replay: the main() of a harness built without libFuzzer.  Feeds it each
 * file named on the command line, and each file in each directory named
 * (not recursively), once.  Exit 0 when every input ran; a harness that
 * finds a fault aborts (or the sanitizer stops it) first.  Usage:
 *   fuzz_<name> FILE|DIR...
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

static int
run_file(const char *path)
{
	struct stat st;
	uint8_t *d;
	size_t n;
	FILE *f;

	if ((f = fopen(path, "rb")) == NULL || fstat(fileno(f), &st) == -1) {
		fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
		if (f)
			fclose(f);
		return (-1);
	}
	n = (size_t)st.st_size;
	/* exactly n bytes, so a read past the input is seen */
	if ((d = malloc(n ? n : 1)) == NULL ||
	    (n > 0 && fread(d, 1, n, f) != n)) {
		fprintf(stderr, "replay: %s: short read\n", path);
		free(d);
		fclose(f);
		return (-1);
	}
	fclose(f);
	(void)LLVMFuzzerTestOneInput(d, n);
	free(d);
	return (0);
}

int
main(int argc, char **argv)
{
	unsigned long ran = 0;
	char path[4096];
	struct dirent *de;
	struct stat st;
	DIR *dir;

	for (int i = 1; i < argc; i++) {
		if (stat(argv[i], &st) == -1) {
			fprintf(stderr, "replay: %s: %s\n", argv[i],
			        strerror(errno));
			return (1);
		}
		if (!S_ISDIR(st.st_mode)) {
			if (run_file(argv[i]) == -1)
				return (1);
			ran++;
			continue;
		}
		if ((dir = opendir(argv[i])) == NULL)
			return (1);
		while ((de = readdir(dir)) != NULL) {
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "%s/%s", argv[i],
			         de->d_name);
			if (run_file(path) == -1) {
				closedir(dir);
				return (1);
			}
			ran++;
		}
		closedir(dir);
	}
	printf("replay: %lu inputs ran\n", ran);
	return (ran > 0 ? 0 : 1);
}
