/* TCP retransmission event, shared by retransmit.bpf.c and
 * pytest_nettrace/probes/retransmit.py. */
#ifndef NETTRACE_RETRANSMIT_H
#define NETTRACE_RETRANSMIT_H
#include "nettrace.h"

enum retrans_type {
	RETRANS_SEGMENT = 0,  /* tcp:tcp_retransmit_skb (SYN, data, FIN, loss probe) */
	RETRANS_SYNACK = 1,   /* tcp:tcp_retransmit_synack (a listener's request) */
};

struct retrans_event {
	struct nt_hdr h;
	__u64 sk;             /* socket (or request sock for SYN/ACKs): counts per segment */
	__u32 seq;            /* first sequence number of the segment */
	__u32 total_retrans;  /* the socket's retransmitted segments, this one included (SYN/ACK: the request's, before it) */
	__u16 segs;           /* TCP segments this retransmission carried (tcp_skb_pcount; a SYN/ACK: 1) */
	__u8 type;            /* enum retrans_type */
	__u8 family;          /* 4 or 6 */
	__u8 state;           /* TCP state of the socket */
	__u8 pad;
	__u16 sport;          /* local port, host order */
	__u16 dport;          /* remote port */
	__u8 saddr[16];       /* local */
	__u8 daddr[16];       /* remote */
	__s32 err;            /* 0: sent; else the transmit's error, after the kernel counted it (6.14+) */
	__u64 stack[NT_MAX_STACK];
};
#endif
