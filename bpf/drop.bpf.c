// SPDX-License-Identifier: GPL-2.0
/* Packet drops (seed: dropwatch.stp, `perf record -e skb:kfree_skb`).
 *
 * tp_btf/kfree_skb fires for every skb freed as a drop (consume_skb is the
 * non-drop free and has its own tracepoint, which we leave alone). Since
 * 5.17 it carries `enum skb_drop_reason`; older kernels only have the
 * location, so a second program reads two arguments only.
 *
 * Drops can come at line rate, so Python never sees them all: every drop in a
 * watched namespace is counted in drop_counts by (netns, reason, location);
 * only the first drop_cfg.budget per namespace also become detailed events.
 * What was not delivered in detail is counted per key (drop_count.undelivered)
 * so a negative assertion can tell whether a matching drop may be hidden.
 */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "nettrace.h"
#include "drop.h"

NT_WIRE(drop_event);

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define AF_PACKET 17

#define DROP_TAP_RANGES 4

/* Where af_packet frees its own copy of a frame it will not queue (another
 * namespace's frame reaching a packet socket's hook, which is host-wide
 * before 6.15): never the network's packet, so neither counted nor spending
 * a namespace's budget. [start, end) of packet_rcv_fanout, packet_rcv,
 * tpacket_rcv, packet_rcv_spkt from kallsyms; zero: unknown. */
struct drop_range {
	__u64 start;
	__u64 end;
};

const volatile struct {
	__u32 budget;   /* detailed events per watched namespace */
	__u32 pad;
	struct drop_range tap[DROP_TAP_RANGES];
	struct drop_range frag_expiry[2];   /* ip_expire, ip6_frag_expire */
	struct drop_range frag_purge;       /* inet_frag_rbtree_purge */
} drop_cfg = { .budget = 256 };

static __always_inline bool in_range(__u64 location, __u64 start, __u64 end)
{
	return start && location >= start && location < end;
}

static __always_inline bool tap_copy(__u64 location)
{
#pragma unroll
	for (int i = 0; i < DROP_TAP_RANGES; i++)
		if (location >= drop_cfg.tap[i].start && location < drop_cfg.tap[i].end)
			return true;
	return false;
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct drop_key);
	__type(value, struct drop_count);
} drop_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);   /* netns inode */
	__type(value, struct drop_scope);
} drop_scopes SEC(".maps");

static __always_inline void read_packet(struct drop_event *e, const struct sk_buff *skb)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	unsigned char *l4 = 0;
	__u8 first = 0;

	e->family = 0;
	e->ip_proto = 0;
	e->has_ports = 0;
	e->sport = e->dport = 0;
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	if (e->protocol != ETH_P_IP && e->protocol != ETH_P_IPV6)
		return;
	if (bpf_probe_read_kernel(&first, 1, head + nh))
		return;
	if (e->protocol == ETH_P_IP && (first >> 4) == 4) {
		struct iphdr ip = {};
		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh))
			return;
		e->family = 4;
		e->ip_proto = ip.protocol;
		__builtin_memcpy(e->saddr, &ip.saddr, 4);
		__builtin_memcpy(e->daddr, &ip.daddr, 4);
		/* later fragments carry no ports */
		if (bpf_ntohs(ip.frag_off) & 0x1fff)
			return;
		l4 = head + nh + (ip.ihl & 0xf) * 4;
	} else if (e->protocol == ETH_P_IPV6 && (first >> 4) == 6) {
		struct ipv6hdr ip6 = {};
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			return;
		e->family = 6;
		e->ip_proto = ip6.nexthdr;  /* extension headers: ports not followed */
		bpf_probe_read_kernel(e->saddr, 16, &ip6.saddr);
		bpf_probe_read_kernel(e->daddr, 16, &ip6.daddr);
		l4 = head + nh + sizeof(ip6);
	} else {
		return;
	}
	if (e->ip_proto == IPPROTO_TCP || e->ip_proto == IPPROTO_UDP) {
		__be16 ports[2] = {};
		if (bpf_probe_read_kernel(ports, sizeof(ports), l4) == 0) {
			e->sport = bpf_ntohs(ports[0]);
			e->dport = bpf_ntohs(ports[1]);
			e->has_ports = 1;
		}
	}
}

static __always_inline struct drop_count *count_of(struct drop_key *key)
{
	struct drop_count *c = bpf_map_lookup_elem(&drop_counts, key);
	if (c)
		return c;
	struct drop_count zero = {};
	bpf_map_update_elem(&drop_counts, key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&drop_counts, key);  /* NULL: map full */
}

/* The last drop a reassembly timeout made on this CPU, and its namespace.
 * An expired queue's head is dropped with its device, then the rest of the
 * queue at once, in the same timer callback on the same CPU, by
 * inet_frag_rbtree_purge: those fragments' skb->dev shares its memory with
 * the tree node, so they have no device (nor socket) of their own. */
struct drop_frag_expiry {
	__u64 ts;
	__u32 netns;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct drop_frag_expiry);
} drop_frag_expiry SEC(".maps");

#define FRAG_EXPIRY_WINDOW_NS 1000000  /* one callback's drops: microseconds apart */

/* The namespace of a queue's fragments dropped with its expired head
 * (`netns`: that of the head, 0 when the drop had none): 0 if none. Told
 * by where the frees are (drop reasons for them came in 6.2). */
static __always_inline __u32 frag_expiry_netns(__u64 location, __u32 netns)
{
	bool expiry = in_range(location, drop_cfg.frag_expiry[0].start, drop_cfg.frag_expiry[0].end) ||
		      in_range(location, drop_cfg.frag_expiry[1].start, drop_cfg.frag_expiry[1].end);
	if (netns ? !expiry : !in_range(location, drop_cfg.frag_purge.start, drop_cfg.frag_purge.end))
		return 0;
	__u32 zero = 0;
	struct drop_frag_expiry *last = bpf_map_lookup_elem(&drop_frag_expiry, &zero);
	if (!last)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (netns) {
		last->ts = now;
		last->netns = netns;
		return netns;
	}
	return now - last->ts < FRAG_EXPIRY_WINDOW_NS ? last->netns : 0;
}

static __always_inline int on_drop(void *ctx, struct sk_buff *skb, void *location,
				   bool has_reason, __u32 reason, const struct sock *rx_sk)
{
	if (!skb || nt_idle() || tap_copy((__u64)location))
		return 0;
	struct net_device *dev = BPF_CORE_READ(skb, dev);
	struct sock *sk = BPF_CORE_READ(skb, sk);
	__u32 netns;

	/* TCP's receive path has no device on the segment (tcp_v4_rcv and
	 * tcp_v6_rcv set skb->dev = NULL before handing it to a socket) and an
	 * incoming segment has no owner: a drop by a listener (TCP_LISTEN_OVERFLOW,
	 * a syncookie that found the accept queue full) or by a connection
	 * (TCP_ABORT_ON_DATA, TCP_OLD_DATA, ...) is named by the socket that
	 * dropped it, the tracepoint's rx_sk (6.11+) */
	if (!sk)
		sk = (struct sock *)rx_sk;

	/* queued on a packet socket (a capture's copy, owned by it) and freed
	 * with its queue when it closes: never the network's packet */
	if (sk && BPF_CORE_READ(sk, __sk_common.skc_family) == AF_PACKET)
		return 0;

	/* where it was dropped: the device's namespace, else the socket's */
	if (dev) {
		netns = nt_netns_of_dev(dev);
		frag_expiry_netns((__u64)location, netns);
	} else if (sk) {
		netns = nt_netns_of_sk(sk);
	} else {
		netns = frag_expiry_netns((__u64)location, 0);
		if (!netns)
			return 0;
	}
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 0;

	struct drop_key key = { .netns = netns, .reason = reason, .location = (__u64)location };
	struct drop_count *count = count_of(&key);
	struct drop_scope *ds = bpf_map_lookup_elem(&drop_scopes, &netns);
	if (count)
		__sync_fetch_and_add(&count->total, 1);

	/* no drop_scope yet: the namespace is being added; no budget applies */
	if (ds && ds->detailed >= drop_cfg.budget) {
		__sync_fetch_and_add(&ds->summarized, 1);
		goto undelivered;
	}
	struct drop_event *e = nt_reserve(scope, NT_KIND_DROP, struct drop_event);
	if (!e)
		goto undelivered;
	if (ds)
		__sync_fetch_and_add(&ds->detailed, 1);

	nt_fill_hdr(&e->h, NT_KIND_DROP, netns);
	e->location = (__u64)location;
	e->reason = reason;
	e->has_reason = has_reason;
	e->len = BPF_CORE_READ(skb, len);
	e->protocol = bpf_ntohs(BPF_CORE_READ(skb, protocol));
	e->ifindex = dev ? BPF_CORE_READ(dev, ifindex) : 0;
	e->pad[0] = e->pad[1] = 0;
	__builtin_memset(e->dev, 0, sizeof(e->dev));
	if (dev)
		bpf_probe_read_kernel_str(e->dev, sizeof(e->dev), &dev->name);
	read_packet(e, skb);
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;

undelivered:
	if (count)
		__sync_fetch_and_add(&count->undelivered, 1);
	else if (ds)
		__sync_fetch_and_add(&ds->unaccounted, 1);
	return 0;
}

static __always_inline bool consumed(__u32 reason)
{
	/* a consumed skb is not a drop (kernels that route it through kfree_skb) */
	return bpf_core_enum_value_exists(enum skb_drop_reason, SKB_CONSUMED) &&
	       reason == bpf_core_enum_value(enum skb_drop_reason, SKB_CONSUMED);
}

/* 6.11+: kfree_skb(skb, location, reason, rx_sk) */
SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_tp_sk, struct sk_buff *skb, void *location)
{
	__u32 reason = (__u32)ctx[2];

	if (consumed(reason))
		return 0;
	return on_drop(ctx, skb, location, true, reason, (const struct sock *)ctx[3]);
}

/* 5.17 to 6.10: kfree_skb(skb, location, reason) */
SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_tp, struct sk_buff *skb, void *location)
{
	__u32 reason = (__u32)ctx[2];

	if (consumed(reason))
		return 0;
	return on_drop(ctx, skb, location, true, reason, NULL);
}

/* Before 5.17: kfree_skb(skb, location), no reason. */
SEC("tp_btf/kfree_skb")
int BPF_PROG(drop_tp_noreason, struct sk_buff *skb, void *location)
{
	return on_drop(ctx, skb, location, false, 0, NULL);
}
