/* TCP connection event (connect / accept / close), shared by conn.bpf.c and
 * pytest_nettrace/probes/conn.py. */
#ifndef NETTRACE_CONN_H
#define NETTRACE_CONN_H
#include "nettrace.h"

enum conn_action {
	CONN_CONNECT = 0,      /* active open reached ESTABLISHED */
	CONN_ESTABLISHED = 1,  /* passive open reached ESTABLISHED (not accepted yet) */
	CONN_ACCEPTED = 2,     /* a process took it from the listen queue (accept returned) */
	CONN_CLOSE = 3,        /* reached CLOSE from any state but LISTEN */
};

/* nt_hdr.flags */
#define CONN_F_SOFTIRQ 0x40  /* the state change ran in softirq (conn_softirq_entry/exit) */
#define CONN_F_STACK 0x80    /* the record is a struct conn_stack_event */

/* conn_socks value: who opened the socket and when (tcplife's birth map). */
struct conn_owner {
	__u64 birth_ns;     /* SYN_SENT (active) or SYN_RECV (passive) */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u16 has_owner;    /* passive: 0 until a process accepts it */
	__u16 active;       /* opened by connect(): its SYN is in bytes_acked */
	char comm[NT_COMM_LEN];
};

/* Two records: a close that ended no FIN exchange carries the kernel stack
 * that closed it (struct conn_stack_event, flagged CONN_F_STACK); every
 * other record is the same members without it (its 384 bytes were two thirds
 * of the record, copied for nothing). */
#define CONN_EVENT_MEMBERS                                                                   \
	struct nt_hdr h;                                                                     \
	__u64 sk;             /* socket address: joins ESTABLISHED and ACCEPTED records */   \
	__u64 duration_ns;    /* CLOSE: since birth, when has_birth */                       \
	__u64 bytes_acked;    /* CLOSE: payload sent and acknowledged (tcplife's TX) */      \
	__u64 bytes_received; /* CLOSE: payload received (without FIN) */                    \
	__u32 owner_pid;                                                                     \
	__u32 owner_tid;                                                                     \
	__u32 owner_uid;                                                                     \
	char owner_comm[NT_COMM_LEN];                                                        \
	__u8 action;          /* enum conn_action */                                         \
	__u8 family;          /* 4 or 6 */                                                   \
	__u8 oldstate;                                                                       \
	__u8 newstate;                                                                       \
	__u8 has_owner;                                                                      \
	__u8 has_birth;                                                                      \
	__u16 sport;          /* local port, host order */                                   \
	__u16 dport;          /* remote port */                                              \
	__u16 pad;                                                                           \
	__u8 saddr[16];       /* local */                                                    \
	__u8 daddr[16];       /* remote */

struct conn_event {
	CONN_EVENT_MEMBERS
};

struct conn_stack_event {
	CONN_EVENT_MEMBERS
	__u64 stack[NT_MAX_STACK];
};
#endif
