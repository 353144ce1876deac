/* SPDX-License-Identifier: ISC */
/*
 * ipc_peer_dial: a stranger for ipc_test.  Dials the mailbox URL given,
 * sends one well-formed batch announcing itself as "stranger", waits, and
 * exits.  ipc_test runs it as another user to check that a mailbox takes
 * nothing from other users.
 */
#include <stdio.h>
#include <unistd.h>

#include <nng/nng.h>
#include <nng/protocol/pipeline0/push.h>

#include "mpk.h"

/* nng 1.5.2 can leak a message whose pipe the peer closes under it (nng
 * #1713, PITFALLS.md); this helper's own exit is not what is tested, so
 * LeakSanitizer stays quiet here when the suite is built with it. */
const char *__asan_default_options(void);
const char *
__asan_default_options(void)
{
	return ("detect_leaks=0");
}

int
main(int argc, char **argv)
{
	struct buf b = { 0 };
	msgpack_packer pk;
	nng_socket s;
	nng_msg *m;

	if (argc != 2) {
		fprintf(stderr, "usage: ipc_peer_dial URL\n");
		return (2);
	}
	mpk_packer_init(&pk, &b);
	msgpack_pack_array(&pk, 5);
	mpk_pack_cstr(&pk, "trp");
	msgpack_pack_uint16(&pk, 1);
	mpk_pack_cstr(&pk, "stranger");
	msgpack_pack_uint64(&pk, (uint64_t)getpid()); /* a new sender */
	msgpack_pack_uint64(&pk, 1);
	msgpack_pack_array(&pk, 8);
	msgpack_pack_uint16(&pk, 1);
	msgpack_pack_uint16(&pk, 0x7777);
	msgpack_pack_uint64(&pk, 1);
	mpk_pack_cstr(&pk, "req");
	mpk_pack_cstr(&pk, "");
	msgpack_pack_uint64(&pk, 0);
	mpk_pack_cstr(&pk, "stranger");
	msgpack_pack_array(&pk, 1);
	msgpack_pack_uint64(&pk, 7);
	if (nng_push0_open(&s) != 0 || nng_dial(s, argv[1], NULL, 0) != 0 ||
	    nng_msg_alloc(&m, 0) != 0 || nng_msg_append(m, b.b, b.len) != 0)
		return (1);
	buf_free(&b);
	nng_socket_set_ms(s, NNG_OPT_SENDTIMEO, 1000);
	/* Refused by the mailbox, the send times out: still a clean exit. */
	if (nng_sendmsg(s, m, 0) != 0)
		nng_msg_free(m);
	usleep(500000);
	nng_close(s);
	return (0);
}
