// SPDX-License-Identifier: GPL-2.0
/* Traffic per process and device (seed 001, nettop.stp), aggregated in the
 * kernel: one hash update per packet in a watched namespace, one netns
 * lookup for every other packet. See traffic.h for how packets find their
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
#define TCP_SYN_SENT 2
#define TCP_LISTEN 10

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct traffic_key);
	__type(value, struct traffic_counters);
} tf_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct traffic_owner_key);
	__type(value, struct traffic_owner);
} tf_owners SEC(".maps");

/* (proto, local port) of the packet whose L3 header starts at l3: one read
 * of the IP and L4 headers in the common case. */
static __always_inline void flow_of(const unsigned char *l3, __u16 eth_proto, bool rx,
				    __u8 *proto, __u16 *port)
{
	union {
		struct { struct iphdr ip; __u8 l4[8]; } v4;
		struct { struct ipv6hdr ip; __u8 l4[8]; } v6;
	} h;
	__u8 *l4;
	__u8 l4proto;

	if (eth_proto == ETH_P_IP) {
		if (bpf_probe_read_kernel(&h.v4, sizeof(h.v4), l3))
			return;
		l4proto = h.v4.ip.protocol;
		*proto = l4proto;
		if (h.v4.ip.frag_off & bpf_htons(0x1FFF))  /* a later fragment: no L4 header */
			return;
		l4 = h.v4.l4;
		if (h.v4.ip.ihl != 5 && bpf_probe_read_kernel(l4, sizeof(h.v4.l4), l3 + h.v4.ip.ihl * 4))
			return;  /* IP options: the L4 header is further */
	} else if (eth_proto == ETH_P_IPV6) {
		if (bpf_probe_read_kernel(&h.v6, sizeof(h.v6), l3))
			return;
		l4proto = h.v6.ip.nexthdr;  /* extension headers: counted without a port */
		*proto = l4proto;
		l4 = h.v6.l4;
	} else {
		return;
	}
	if (l4proto == IPPROTO_TCP || l4proto == IPPROTO_UDP) {
		__u16 p = rx ? (l4[2] << 8 | l4[3]) : (l4[0] << 8 | l4[1]);
		*port = p;
	} else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
		/* echo request/reply: the id is the ping socket's port */
		if (l4[0] == 0 || l4[0] == 8 || l4[0] == 128 || l4[0] == 129)
			*port = l4[4] << 8 | l4[5];
	}
}

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
	flow_of(l3, eth_proto, rx, &key.proto, &key.port);

	struct traffic_counters *c = bpf_map_lookup_elem(&tf_counters, &key);
	if (!c) {
		struct traffic_counters init = {};
		bpf_probe_read_kernel_str(init.dev, sizeof(init.dev), dev->name);
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

/* Who uses a port: the process that sends, receives, listens or connects on
 * it (these tracepoints fire in the calling task). */
static __always_inline void own(const struct sock *sk)
{
	if (nt_idle())
		return;
	__u32 netns = sk->__sk_common.skc_net.net->ns.inum;
	if (!nt_watched(netns))
		return;
	struct task_struct *task = bpf_get_current_task_btf();
	if (task->flags & PF_KTHREAD)
		return;
	struct traffic_owner_key key = {
		.netns = netns,
		.port = sk->__sk_common.skc_num,
		.proto = (__u8)sk->sk_protocol,
	};
	if (!key.port || sk->sk_type == 3 /* SOCK_RAW: its "port" is a protocol */)
		return;
	__u32 pid = nt_ns_pid(task, task->tgid, true);
	struct traffic_owner *cur = bpf_map_lookup_elem(&tf_owners, &key);
	if (cur && cur->pid == pid)
		return;
	struct traffic_owner o = { .pid = pid, .uid = (__u32)bpf_get_current_uid_gid() };
	bpf_get_current_comm(o.comm, sizeof(o.comm));
	bpf_map_update_elem(&tf_owners, &key, &o, BPF_ANY);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(traffic_send, struct sock *sk, int ret, int flags)
{
	own(sk);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(traffic_recv, struct sock *sk, int ret, int flags)
{
	own(sk);
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
			own(sk);                                               \
		return 0;                                                      \
	}

OWN_FROM_SOCKET(traffic_send4_fentry, inet_sendmsg)
OWN_FROM_SOCKET(traffic_send6_fentry, inet6_sendmsg)
OWN_FROM_SOCKET(traffic_recv4_fentry, inet_recvmsg)
OWN_FROM_SOCKET(traffic_recv6_fentry, inet6_recvmsg)

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(traffic_state, const struct sock *sk, const int oldstate, const int newstate)
{
	/* listen() runs in the listener; other transitions may be softirq's */
	if (newstate == TCP_LISTEN)
		own(sk);
	return 0;
}
