/* Per-process traffic counters (nettop), shared by traffic.bpf.c and
 * pytest_nettrace/probes/traffic.py. Nothing goes through the ring buffer:
 * packets are counted in tf_counters, keyed by the sending process when the
 * kernel knows it at the packet, else by the packet's local port. Packets
 * whose process is not known then (received in softirq, sent by the kernel
 * for a socket) have pid 0: Python joins them with tf_owners (which
 * processes used that port) when the test reads them. */
#ifndef NETTRACE_TRAFFIC_H
#define NETTRACE_TRAFFIC_H
#include "nettrace.h"

struct traffic_key {
	__u32 netns;
	__u32 ifindex;
	__u32 pid;      /* the sending process (tgid) when the packet was sent in its system call; else 0 */
	__u16 port;     /* pid 0: local port (tx source, rx destination; ICMP echo id); else 0 */
	__u8 proto;     /* IPPROTO_* (a fragment's: the datagram's); 0 when not IP */
	__u8 pad;
};

struct traffic_counters {
	__u64 tx_packets;  /* as the device counts them: a GSO/GRO aggregate is one */
	__u64 rx_packets;
	__u64 tx_bytes;    /* link-layer bytes, both directions */
	__u64 rx_bytes;
	char dev[16];      /* skb->dev->name when the row was made */
	__u32 uid;         /* of key.pid when the row was made */
	char comm[NT_COMM_LEN];
};

/* One entry per process that sent, received, listened or connected on a port. */
struct traffic_owner_key {
	__u32 netns;
	__u32 pid;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct traffic_owner {
	__u32 uid;
	char comm[NT_COMM_LEN];
};

/* A fragmented datagram, from its first fragment (the only one with the L4
 * header) to its others. */
struct traffic_frag_key {
	__u32 netns;
	__u32 id;          /* IPv4's 16-bit or IPv6's 32-bit identification */
	__u8 addrs[32];    /* source, destination: IPv4 in the first 4 bytes of each */
	__u8 proto;
	__u8 rx;
	__u8 pad[2];
};
#endif
