/* Network system calls of the test's processes (strace -e trace=network),
 * shared by syscall.bpf.c and pytest_nettrace/probes/syscall.py. */
#ifndef NETTRACE_SYSCALL_H
#define NETTRACE_SYSCALL_H
#include "nettrace.h"

#define SC_MAX_NR 512      /* syscall numbers watched: below this */
#define SC_ADDR_MAX 112    /* a sockaddr_un (110) fits; sockaddr_in6 is 28 */

/* Which call: the Python side maps the architecture's syscall numbers to these. */
enum sc_code {
	SC_SOCKET = 1, SC_SOCKETPAIR, SC_CONNECT, SC_BIND, SC_LISTEN, SC_ACCEPT, SC_ACCEPT4,
	SC_SENDTO, SC_SENDMSG, SC_SENDMMSG, SC_RECVFROM, SC_RECVMSG, SC_RECVMMSG,
	SC_SETSOCKOPT, SC_GETSOCKOPT, SC_SHUTDOWN, SC_GETSOCKNAME, SC_GETPEERNAME, SC_CLOSE,
};

struct syscall_event {
	struct nt_hdr h;
	__u64 args[6];
	__s64 ret;
	__u64 duration;         /* ns from entry to exit */
	__u16 code;             /* enum sc_code */
	__u16 addr_len;         /* bytes of addr copied */
	__s32 value;            /* socketpair: first fd; getsockopt: the option's length it returned;
				 * accept, getsockname, recvfrom...: the address's length returned */
	__s32 value2;           /* socketpair: second fd; getsockopt, accept...: the room the caller gave (has_value) */
	__u8 has_value;
	__u8 pad[3];
	/* the call's sockaddr (in: connect/bind/sendto/sendmsg; out: accept/recvfrom/...);
	 * setsockopt/getsockopt: the option's value (in / out) */
	__u8 addr[SC_ADDR_MAX];
};
#endif
