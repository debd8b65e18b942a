/* Packet drop event and aggregation maps, shared by drop.bpf.c and
 * pytest_nettrace/probes/drop.py. */
#ifndef NETTRACE_DROP_H
#define NETTRACE_DROP_H
#include "nettrace.h"

#define DROP_DEV_LEN 16

/* drop_counts key: every drop in a watched namespace is counted here,
 * whether or not it was also delivered as a detailed event. */
struct drop_key {
	__u32 netns;
	__u32 reason;    /* enum skb_drop_reason value (0 when the kernel has none) */
	__u64 location;  /* kernel address that freed the skb */
};

struct drop_count {
	__u64 total;        /* drops at this (netns, reason, location) */
	__u64 undelivered;  /* of which: not delivered as an event (budget spent or ring full) */
};

/* drop_scopes value, per watched namespace (the loader adds and removes it). */
struct drop_scope {
	__u64 detailed;     /* detailed events reserved so far (the budget's use) */
	__u64 summarized;   /* drops past the budget: counted in drop_counts only */
	__u64 unaccounted;  /* not delivered AND not in drop_counts (that map was full) */
};

struct drop_event {
	struct nt_hdr h;
	__u64 location;
	__u32 reason;
	__u32 len;           /* skb->len */
	__u32 ifindex;
	__u16 protocol;      /* skb->protocol, host order (ETH_P_*) */
	__u8 family;         /* 4, 6, or 0 when the packet is not IP */
	__u8 ip_proto;       /* IPPROTO_* when family != 0 */
	__u16 sport;         /* host order; TCP/UDP only */
	__u16 dport;
	__u8 has_reason;
	__u8 has_ports;
	__u8 pad[2];
	char dev[DROP_DEV_LEN];
	__u8 saddr[16];      /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u64 stack[NT_MAX_STACK];
};
#endif
