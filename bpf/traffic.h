/* Per-process traffic counters (nettop), shared by traffic.bpf.c and
 * pytest_nettrace/probes/traffic.py. Nothing goes through the ring buffer:
 * packets are counted in tf_counters, keyed by the packet's local port, and
 * Python joins the counters with tf_owners (which process uses that port)
 * when the test reads them, so packets received in softirq, or sent before
 * the owner was known (a SYN), still land on the right process. */
#ifndef NETTRACE_TRAFFIC_H
#define NETTRACE_TRAFFIC_H
#include "nettrace.h"

struct traffic_key {
	__u32 netns;
	__u32 ifindex;
	__u16 port;     /* local port: tx source, rx destination; ICMP echo id; 0 if none */
	__u8 proto;     /* IPPROTO_*; 0 when not IP */
	__u8 pad;
};

struct traffic_counters {
	__u64 tx_packets;  /* as the device counts them: a GSO/GRO aggregate is one */
	__u64 rx_packets;
	__u64 tx_bytes;    /* link-layer bytes, both directions */
	__u64 rx_bytes;
	char dev[16];      /* skb->dev->name when the row was made */
};

struct traffic_owner_key {
	__u32 netns;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct traffic_owner {
	__u32 pid;   /* tgid of the last process that sent/received/listened/connected on the port */
	__u32 uid;
	char comm[NT_COMM_LEN];
};
#endif
