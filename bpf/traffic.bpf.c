// SPDX-License-Identifier: GPL-2.0
/* Traffic per process and device (seed 001, nettop.stp), aggregated in the
 * kernel: one hash update per packet in a watched namespace (and one LRU
 * update or lookup per IP fragment), one netns lookup for every other
 * packet. See traffic.h for how packets find their
 * process. */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "nettrace.h"
#include "traffic.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define TCP_LISTEN 10

/* A test of short connections takes one entry per connection here (the
 * client port's packets that have no process) and one in tf_owners: 32k
 * each, ~0.2 ms more of map creation than 16k, not preallocated. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct traffic_key);
	__type(value, struct traffic_counters);
} tf_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct traffic_owner_key);
	__type(value, struct traffic_owner);
} tf_owners SEC(".maps");

/* Fragments of one datagram: only the first has the L4 header. Written at a
 * first fragment, read at the others (sent and received in order, as the
 * kernel sends them); an LRU, so nothing needs to delete its entries. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct traffic_frag_key);
	__type(value, __u32);
} tf_frags SEC(".maps");

/* The port of a fragmented datagram: remembered at its first fragment
 * (first), looked up at the others. */
static __always_inline void frag_port(struct traffic_frag_key *fk, bool first, __u16 *port)
{
	if (first) {
		__u32 p = *port;
		bpf_map_update_elem(&tf_frags, fk, &p, BPF_ANY);
	} else {
		__u32 *p = bpf_map_lookup_elem(&tf_frags, fk);
		if (p)
			*port = *p;
	}
}

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define NEXTHDR_FRAGMENT 44

/* (proto, local port) of the packet whose L3 header starts at l3, and its
 * TCP flags: one read of the IP and L4 headers in the common case. */
static __always_inline __u8 flow_of(const unsigned char *l3, __u16 eth_proto, bool rx, __u32 netns,
				    struct traffic_key *key)
{
	union {
		struct { struct iphdr ip; __u8 l4[14]; } v4;
		struct { struct ipv6hdr ip; __u8 l4[14]; } v6;
	} h;
	struct traffic_frag_key fk = { .netns = netns, .rx = rx };
	bool fragment = false, first = false;
	__u8 *l4;
	__u8 l4proto;

	if (eth_proto == ETH_P_IP) {
		if (bpf_probe_read_kernel(&h.v4, sizeof(h.v4), l3))
			return 0;
		l4proto = h.v4.ip.protocol;
		__u16 frag = bpf_ntohs(h.v4.ip.frag_off);
		if (frag & (IP_MF | IP_OFFSET)) {
			fragment = true;
			first = !(frag & IP_OFFSET);
			fk.id = h.v4.ip.id;
			__builtin_memcpy(fk.addrs, &h.v4.ip.saddr, 4);
			__builtin_memcpy(fk.addrs + 16, &h.v4.ip.daddr, 4);
		}
		l4 = h.v4.l4;
		if (first || !fragment) {
			if (h.v4.ip.ihl != 5 &&
			    bpf_probe_read_kernel(l4, sizeof(h.v4.l4), l3 + h.v4.ip.ihl * 4))
				return 0;  /* IP options: the L4 header is further */
		}
	} else if (eth_proto == ETH_P_IPV6) {
		if (bpf_probe_read_kernel(&h.v6, sizeof(h.v6), l3))
			return 0;
		l4proto = h.v6.ip.nexthdr;  /* other extension headers: counted without a port */
		l4 = h.v6.l4;
		if (l4proto == NEXTHDR_FRAGMENT) {
			/* struct frag_hdr: nexthdr, reserved, offset and M flag, id */
			fragment = true;
			l4proto = l4[0];
			first = !((l4[2] << 8 | l4[3]) & 0xFFF8);
			__builtin_memcpy(&fk.id, l4 + 4, 4);
			__builtin_memcpy(fk.addrs, &h.v6.ip.saddr, 32);
			if (first && bpf_probe_read_kernel(l4, sizeof(h.v6.l4), l3 + sizeof(h.v6.ip) + 8))
				return 0;
		}
	} else {
		return 0;
	}
	key->proto = l4proto;
	__u16 port = 0;
	if (fragment && !first) {
		fk.proto = l4proto;
		frag_port(&fk, false, &key->port);
		return 0;
	}
	if (l4proto == IPPROTO_TCP || l4proto == IPPROTO_UDP) {
		port = rx ? (l4[2] << 8 | l4[3]) : (l4[0] << 8 | l4[1]);
	} else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
		/* echo request/reply: the id is the ping socket's port */
		if (l4[0] == 0 || l4[0] == 8 || l4[0] == 128 || l4[0] == 129)
			port = l4[4] << 8 | l4[5];
	}
	key->port = port;
	if (fragment) {
		fk.proto = l4proto;
		frag_port(&fk, true, &key->port);
	}
	return l4proto == IPPROTO_TCP ? l4[13] : 0;
}

#define TCPF_SYN 0x02
#define TCPF_ACK 0x10
#define SOCK_STREAM 1
#define SOCK_SEQPACKET 5

/* Whether the packet's socket is being sent on by the current task, in its
 * system call: then that task is the sender. A datagram or raw socket sends
 * only from sendmsg; a stream socket also from softirq (ACKs, retransmits),
 * but only while no task holds it (lock_sock): held, it is its holder that
 * sends. A TCP listener is the exception: it answers stray segments with a
 * RST from softirq without its lock (and recent kernels make it the RST's owner),
 * while its process may hold it in accept() or setsockopt(): it is never
 * the current task's (the port's owner is the listener's process). The
 * kernel's own sockets (TCP resets, ICMP errors) and request and time-wait
 * socks (no full struct sock) have no process. A qdisc that holds
 * packets back sends them later, in whatever context dequeues them: on such
 * a device (not veth, lo, bridge: noqueue) the owner is that context's. */
static __always_inline bool sent_by_current(const struct sock *sk, struct task_struct *task)
{
	if (task->flags & PF_KTHREAD)
		return false;
	int state = sk->__sk_common.skc_state;
	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV || BPF_CORE_READ_BITFIELD(sk, sk_kern_sock))
		return false;
	if (sk->sk_type == SOCK_STREAM && state == TCP_LISTEN)
		return false;
	if (sk->sk_type == SOCK_STREAM || sk->sk_type == SOCK_SEQPACKET)
		return sk->sk_lock.owned;
	return true;
}

static __always_inline void own_as(const struct sock *sk, __u32 netns, __u32 pid);

/* Fields are read directly through the tracepoints' BTF-typed pointers
 * (plain loads, no helper call): this runs for every packet of the machine.
 * A packet is what the device passed: a GSO/GRO aggregate is one, as the
 * device's own counters (ip -s link) and tcpdump on it count it, and as
 * nettop.stp counted one per netdev.transmit/receive. */
static __always_inline void count(const struct sk_buff *skb, const struct net_device *dev, bool rx)
{
	if (nt_idle())
		return;
	__u32 netns = dev->nd_net.net->ns.inum;
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return;

	unsigned char *head = skb->head;
	__u16 eth_proto = bpf_ntohs(skb->protocol);
	__u64 bytes = skb->len;
	const unsigned char *l3;
	if (rx) {
		/* eth_type_trans pulled the link header: data is L3; count it back */
		l3 = skb->data;
		__u16 mac = skb->mac_header;
		if (mac != (__u16)~0U && head + mac < l3)
			bytes += l3 - (head + mac);
	} else {
		l3 = head + skb->network_header;
	}
	struct traffic_key key = { .netns = netns, .ifindex = dev->ifindex };
	/* read before flow_of's branches: the verifier checks a pointer read
	 * from a tracepoint's argument against the kernel's whole BTF, once
	 * for each path that reaches the read (~1 ms each on 6.18) */
	struct sock *sk = rx ? NULL : skb->sk;
	barrier_var(sk);
	__u8 tcp_flags = flow_of(l3, eth_proto, rx, netns, &key);
	if (!rx) {
		struct task_struct *task = bpf_get_current_task_btf();
		if (sk && sent_by_current(sk, task)) {
			key.pid = nt_ns_pid(task, task->tgid, true);
			/* connect()'s SYN: the port is chosen after the state
			 * change to SYN_SENT, so its owner is learnt here, for
			 * the answer (a SYN-ACK, or a RST of a port scan) */
			if ((tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN && key.pid)
				own_as(sk, netns, key.pid);
		}
	}
	/* the port only finds the process of a packet that has none; keyed by
	 * it, a sender's packets took a row per client port: one per
	 * connection, which filled the map after ~8k short connections */
	if (key.pid)
		key.port = 0;

	struct traffic_counters *c = bpf_map_lookup_elem(&tf_counters, &key);
	if (!c) {
		struct traffic_counters init = {};
		bpf_probe_read_kernel_str(init.dev, sizeof(init.dev), dev->name);
		if (key.pid) {
			init.uid = (__u32)bpf_get_current_uid_gid();
			bpf_get_current_comm(init.comm, sizeof(init.comm));
		}
		if (bpf_map_update_elem(&tf_counters, &key, &init, BPF_NOEXIST) &&
		    !bpf_map_lookup_elem(&tf_counters, &key)) {
			/* map full: the totals would be short; negative assertions must know */
			__sync_fetch_and_add(&scope->lost[NT_KIND_TRAFFIC], 1);
			return;
		}
		c = bpf_map_lookup_elem(&tf_counters, &key);
		if (!c)
			return;
	}
	if (rx) {
		__sync_fetch_and_add(&c->rx_packets, 1);
		__sync_fetch_and_add(&c->rx_bytes, bytes);
	} else {
		__sync_fetch_and_add(&c->tx_packets, 1);
		__sync_fetch_and_add(&c->tx_bytes, bytes);
	}
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(traffic_tx, const struct sk_buff *skb, const struct net_device *dev)
{
	count(skb, dev, false);
	return 0;
}

#define PACKET_LOOPBACK 5

SEC("tp_btf/netif_receive_skb")
int BPF_PROG(traffic_rx, struct sk_buff *skb)
{
	/* the local copy of a broadcast or multicast the host sent
	 * (dev_loopback_xmit): the device received nothing, nor counts it */
	if (BPF_CORE_READ_BITFIELD(skb, pkt_type) == PACKET_LOOPBACK)
		return 0;
	count(skb, skb->dev, true);
	return 0;
}

/* Who uses a port: each process that sends, receives, listens or connects
 * on it (these tracepoints fire in the calling task), one entry each, so
 * that a port several processes used is seen as such. */
static __always_inline void own_as(const struct sock *sk, __u32 netns, __u32 pid)
{
	struct traffic_owner_key key = {
		.netns = netns,
		.pid = pid,
		.port = sk->__sk_common.skc_num,
		.proto = (__u8)sk->sk_protocol,
	};
	if (!key.port || sk->sk_type == 3 /* SOCK_RAW: its "port" is a protocol */)
		return;
	if (bpf_map_lookup_elem(&tf_owners, &key))
		return;
	struct traffic_owner o = { .uid = (__u32)bpf_get_current_uid_gid() };
	bpf_get_current_comm(o.comm, sizeof(o.comm));
	bpf_map_update_elem(&tf_owners, &key, &o, BPF_NOEXIST);
}

/* `hot`: on every send and receive of the machine, the namespace is loaded
 * through the socket's pointer; elsewhere read, which spares the verifier
 * four searches of the kernel's whole BTF (~1 ms a program) */
static __always_inline void own(const struct sock *sk, bool hot)
{
	if (nt_idle())
		return;
	__u32 netns = hot ? sk->__sk_common.skc_net.net->ns.inum : nt_netns_of_sk(sk);
	if (!nt_watched(netns))
		return;
	struct task_struct *task = bpf_get_current_task_btf();
	if (task->flags & PF_KTHREAD)
		return;
	own_as(sk, netns, nt_ns_pid(task, task->tgid, true));
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(traffic_send, struct sock *sk, int ret, int flags)
{
	own(sk, true);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(traffic_recv, struct sock *sk, int ret, int flags)
{
	own(sk, true);
	return 0;
}

/* Kernels before 6.3 have no sock_{send,recv}_length tracepoints: the same
 * owners from the entry of the inet protocols' sendmsg/recvmsg, reached
 * through proto_ops pointers, so never inlined (sock_sendmsg can be). */
#define OWN_FROM_SOCKET(name, fn)                                              \
	SEC("fentry/" #fn)                                                     \
	int BPF_PROG(name, struct socket *sock)                                \
	{                                                                      \
		struct sock *sk = sock->sk;                                    \
		if (sk)                                                        \
			own(sk, true);                                            \
		return 0;                                                      \
	}

OWN_FROM_SOCKET(traffic_send4_fentry, inet_sendmsg)
OWN_FROM_SOCKET(traffic_send6_fentry, inet6_sendmsg)
OWN_FROM_SOCKET(traffic_recv4_fentry, inet_recvmsg)
OWN_FROM_SOCKET(traffic_recv6_fentry, inet6_recvmsg)

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(traffic_state, const struct sock *sk, const int oldstate, const int newstate)
{
	/* listen() runs in the listener; other transitions may be softirq's
	 * (connect()'s SYN_SENT comes before its port: see count()) */
	if (newstate == TCP_LISTEN)
		own(sk, false);
	return 0;
}
