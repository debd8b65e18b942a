/* TCP reset event, shared by rst.bpf.c and pytest_nettrace/probes/rst.py. */
#ifndef NETTRACE_RST_H
#define NETTRACE_RST_H
#include "nettrace.h"

enum rst_origin {
	RST_ORIGIN_REPLY = 0,   /* tcp_v{4,6}_send_reset: answer to a segment */
	RST_ORIGIN_ACTIVE = 1,  /* tcp_send_active_reset: we abort a connection */
	RST_ORIGIN_RECEIVED = 2,/* tcp_receive_reset: the peer reset us */
	RST_ORIGIN_FREED = 3,   /* any other RST received, seen as its skb is freed */
};

struct rst_event {
	struct nt_hdr h;
	__u8 origin;     /* enum rst_origin */
	__u8 family;     /* 4 or 6 */
	__u8 state;      /* TCP state of the socket, 7 (CLOSE) when there is none, 0 unknown */
	__u8 has_reason;
	__s32 reason;    /* enum sk_rst_reason when has_reason */
	__u16 sport;     /* host byte order; the RST's own direction */
	__u16 dport;
	__u8 saddr[16];  /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u64 stack[NT_MAX_STACK];
};
#endif
