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

/* (proto, local port) of the packet whose L3 header starts at l3. */
static __always_inline void flow_of(const unsigned char *l3, __u16 eth_proto, bool rx,
				    __u8 *proto, __u16 *port)
{
	__u8 l4proto = 0;
	const unsigned char *l4;

	if (eth_proto == ETH_P_IP) {
		struct iphdr ip;
		if (bpf_probe_read_kernel(&ip, sizeof(ip), l3))
			return;
		l4proto = ip.protocol;
		*proto = l4proto;
		if (ip.frag_off & bpf_htons(0x1FFF))  /* a later fragment: no L4 header */
			return;
		l4 = l3 + ip.ihl * 4;
	} else if (eth_proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), l3))
			return;
		l4proto = ip6.nexthdr;  /* extension headers: counted without a port */
		*proto = l4proto;
		l4 = l3 + sizeof(ip6);
	} else {
		return;
	}
	if (l4proto == IPPROTO_TCP || l4proto == IPPROTO_UDP) {
		__be16 ports[2];
		if (!bpf_probe_read_kernel(ports, sizeof(ports), l4))
			*port = bpf_ntohs(rx ? ports[1] : ports[0]);
	} else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
		__u8 icmp[6];
		if (bpf_probe_read_kernel(icmp, sizeof(icmp), l4))
			return;
		/* echo request/reply: the id is the ping socket's port */
		if (icmp[0] == 0 || icmp[0] == 8 || icmp[0] == 128 || icmp[0] == 129)
			*port = (icmp[4] << 8) | icmp[5];
	}
}

static __always_inline void count(const struct sk_buff *skb, const struct net_device *dev, bool rx)
{
	__u32 netns = nt_netns_of_dev(dev);
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return;

	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 eth_proto = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	__u64 bytes = BPF_CORE_READ(skb, len);
	const unsigned char *l3;
	if (rx) {
		/* eth_type_trans pulled the link header: data is L3; count it back */
		l3 = BPF_CORE_READ(skb, data);
		__u16 mac = BPF_CORE_READ(skb, mac_header);
		if (mac != (__u16)~0U && head + mac < l3)
			bytes += l3 - (head + mac);
	} else {
		l3 = head + BPF_CORE_READ(skb, network_header);
	}
	struct skb_shared_info *shinfo = (void *)(head + BPF_CORE_READ(skb, end));
	__u64 segs = BPF_CORE_READ(shinfo, gso_segs);
	if (!segs)
		segs = 1;

	struct traffic_key key = { .netns = netns, .ifindex = BPF_CORE_READ(dev, ifindex) };
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
		__sync_fetch_and_add(&c->rx_packets, segs);
		__sync_fetch_and_add(&c->rx_bytes, bytes);
	} else {
		__sync_fetch_and_add(&c->tx_packets, segs);
		__sync_fetch_and_add(&c->tx_bytes, bytes);
	}
}

SEC("tp_btf/net_dev_start_xmit")
int BPF_PROG(traffic_tx, const struct sk_buff *skb, const struct net_device *dev)
{
	count(skb, dev, false);
	return 0;
}

SEC("tp_btf/netif_receive_skb")
int BPF_PROG(traffic_rx, struct sk_buff *skb)
{
	count(skb, BPF_CORE_READ(skb, dev), true);
	return 0;
}

/* Who uses a port: the process that sends, receives, listens or connects on
 * it (these tracepoints fire in the calling task). */
static __always_inline void own(const struct sock *sk)
{
	__u32 netns = nt_netns_of_sk(sk);
	if (!nt_watched(netns))
		return;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	if (BPF_CORE_READ(task, flags) & PF_KTHREAD)
		return;
	struct traffic_owner_key key = {
		.netns = netns,
		.port = BPF_CORE_READ(sk, __sk_common.skc_num),
		.proto = (__u8)BPF_CORE_READ(sk, sk_protocol),
	};
	if (!key.port || BPF_CORE_READ(sk, sk_type) == 3 /* SOCK_RAW: its "port" is a protocol */)
		return;
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
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

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(traffic_state, const struct sock *sk, const int oldstate, const int newstate)
{
	/* listen() runs in the listener; other transitions may be softirq's */
	if (newstate == TCP_LISTEN)
		own(sk);
	return 0;
}
