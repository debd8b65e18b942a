// SPDX-License-Identifier: GPL-2.0
/* TCP resets, sent and received (seed 003: "who sent this RST, and why").
 *
 * Mechanisms, best first (the loader enables one set, see probes/rst.py):
 *  - tp_btf/tcp_send_reset with the reset reason (6.10+): covers both the
 *    reply to a segment (skb set) and an active abort (skb NULL);
 *  - on older kernels the tracepoint only reports active resets reliably,
 *    so replies come from fentry (or kprobe) on tcp_v{4,6}_send_reset;
 *  - tp_btf/tcp_receive_reset for resets the peer sent us that a full
 *    socket acted on (tcp_reset); every other RST that reaches TCP (to a
 *    time-wait or request sock, a listener, no socket, out of window) is
 *    seen where its skb is freed (kfree_skb / consume_skb: a RST is never
 *    queued), minus those tcp_receive_reset already reported.
 */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "nettrace.h"
#include "rst.h"

NT_WIRE(rst_event);

#define AF_INET 2
#define AF_INET6 10
#define TCP_SYN_RECV 3
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_STATE_UNKNOWN 0  /* a RST whose socket (if any) nothing told us */
#define AF_PACKET 17
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP 6
#define TCPF_RST 0x04
#define RST_MATCH_NS 10000000ULL  /* a socket's RST is freed microseconds after it acted on it */

/* Set by the loader before load. */
const volatile struct {
	__u32 tp_active_only; /* tracepoint: ignore replies (another program has them) */
	__u32 no_socket;      /* enum skb_drop_reason SKB_DROP_REASON_NO_SOCKET, 0: unknown */
	__u64 tw_timer_fn;    /* address of tw_timer_handler (kallsyms), 0: unknown */
	__u64 req_timer_fn;   /* address of reqsk_timer_handler (kallsyms), 0: unknown */
} rst_cfg = {};

/* A received RST's own ends, IPv4 (and v4-mapped IPv6) in 4 bytes. */
struct rst_flow {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u32 netns;
};

/* The received RST this CPU's TCP last acted on, told to the free hooks:
 * by tcp_receive_reset (then already reported: `reported`) or by the
 * cancelled timer of the time-wait sock the RST killed (its state). */
struct rst_seen {
	struct rst_flow flow;
	__u64 ts;
	__u8 state;
	__u8 reported;
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rst_seen);
} rst_seen SEC(".maps");

static __always_inline void copy_v6(__u8 *dst, const void *src)
{
	bpf_probe_read_kernel(dst, 16, src);
}

/* Addresses of the reset we send in reply to skb: swap the segment's ends. */
static __always_inline void addrs_from_skb(struct rst_event *e, const struct sk_buff *skb)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u16 thoff = BPF_CORE_READ(skb, transport_header);
	__u8 ver = 0;
	struct tcphdr th = {};

	bpf_probe_read_kernel(&ver, 1, head + nh);
	bpf_probe_read_kernel(&th, sizeof(th), head + thoff);
	e->sport = bpf_ntohs(th.dest);
	e->dport = bpf_ntohs(th.source);
	if ((ver >> 4) == 6) {
		struct ipv6hdr *ip6 = (void *)(head + nh);
		e->family = 6;
		copy_v6(e->saddr, &ip6->daddr);
		copy_v6(e->daddr, &ip6->saddr);
	} else {
		struct iphdr *ip = (void *)(head + nh);
		e->family = 4;
		bpf_probe_read_kernel(e->saddr, 4, &ip->daddr);
		bpf_probe_read_kernel(e->daddr, 4, &ip->saddr);
	}
}

/* Addresses of a socket; `peer_first` when the reset came from the peer. */
static __always_inline void addrs_from_sk(struct rst_event *e, const struct sock *sk, bool peer_first)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	/* inet_sport survives the unhash in tcp_set_state(TCP_CLOSE); skc_num does not */
	__u16 lport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	__u16 rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	__u8 *local = peer_first ? e->daddr : e->saddr;
	__u8 *remote = peer_first ? e->saddr : e->daddr;

	e->sport = peer_first ? rport : lport;
	e->dport = peer_first ? lport : rport;
	if (family == AF_INET6) {
		e->family = 6;
		copy_v6(local, &sk->__sk_common.skc_v6_rcv_saddr);
		copy_v6(remote, &sk->__sk_common.skc_v6_daddr);
	} else {
		e->family = 4;
		bpf_probe_read_kernel(local, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_probe_read_kernel(remote, 4, &sk->__sk_common.skc_daddr);
	}
}

static __always_inline void remember(const struct sock_common *c, __u8 state, bool reported);

static __always_inline int emit(void *ctx, const struct sock *sk, const struct sk_buff *skb,
				__u8 origin, bool has_reason, __s32 reason)
{
	__u32 netns;

	if (sk)
		netns = nt_netns_of_sk(sk);
	else if (skb)
		netns = nt_netns_of_dev(BPF_CORE_READ(skb, dev));
	else
		return 0;

	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 0;
	if (origin == RST_ORIGIN_REPLY && skb) {
		/* fentry/kprobe fire at tcp_v{4,6}_send_reset's entry, before its
		 * "never answer a reset with a reset": a RST to no socket read as
		 * one sent back (Debian 6.1, against tcpdump) */
		__u8 flags = 0;
		bpf_probe_read_kernel(&flags, 1, BPF_CORE_READ(skb, head) + BPF_CORE_READ(skb, transport_header) + 13);
		if (flags & TCPF_RST)
			return 0;
	}
	struct rst_event *e = nt_reserve(scope, NT_KIND_RST, struct rst_event);
	if (!e)
		return 0;

	nt_fill_hdr(&e->h, NT_KIND_RST, netns);
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	e->origin = origin;
	e->has_reason = has_reason;
	e->reason = reason;
	e->state = sk ? BPF_CORE_READ(sk, __sk_common.skc_state) : TCP_CLOSE;
	/* a time-wait sock answering: its substate, as ss and a received RST
	 * name it (FIN_WAIT2 for a closed socket waiting for the peer's FIN) */
	if (e->state == TCP_TIME_WAIT)
		e->state = BPF_CORE_READ((struct inet_timewait_sock *)sk, tw_substate);
	if (origin == RST_ORIGIN_REPLY && skb)
		addrs_from_skb(e, skb);
	else
		addrs_from_sk(e, sk, origin == RST_ORIGIN_RECEIVED);
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(rst_send_tp, const struct sock *sk, const struct sk_buff *skb)
{
	bool has_reason = bpf_core_type_exists(enum sk_rst_reason);
	__s32 reason = 0;

	if (skb && rst_cfg.tp_active_only)
		return 0;
	if (has_reason)
		reason = (__s32)ctx[2];
	return emit(ctx, sk, skb, skb ? RST_ORIGIN_REPLY : RST_ORIGIN_ACTIVE, has_reason, reason);
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(rst_recv_tp, const struct sock *sk)
{
	/* its skb's free must not report it again */
	if (nt_watched(nt_netns_of_sk(sk)))
		remember(&sk->__sk_common, 0, true);
	return emit(ctx, sk, NULL, RST_ORIGIN_RECEIVED, false, 0);
}

/* Older kernels: replies to segments, by function entry. */
SEC("fentry/tcp_v4_send_reset")
int BPF_PROG(rst_v4_fentry, const struct sock *sk, struct sk_buff *skb)
{
	return emit(ctx, sk, skb, RST_ORIGIN_REPLY, false, 0);
}

SEC("fentry/tcp_v6_send_reset")
int BPF_PROG(rst_v6_fentry, const struct sock *sk, struct sk_buff *skb)
{
	return emit(ctx, sk, skb, RST_ORIGIN_REPLY, false, 0);
}

SEC("kprobe/tcp_v4_send_reset")
int BPF_KPROBE(rst_v4_kprobe, const struct sock *sk, struct sk_buff *skb)
{
	return emit(ctx, sk, skb, RST_ORIGIN_REPLY, false, 0);
}

SEC("kprobe/tcp_v6_send_reset")
int BPF_KPROBE(rst_v6_kprobe, const struct sock *sk, struct sk_buff *skb)
{
	return emit(ctx, sk, skb, RST_ORIGIN_REPLY, false, 0);
}

/* ---- Received RSTs, wherever TCP frees them ---- */

static __always_inline void unmap_v4(__u8 *a)
{
	__u32 *w = (__u32 *)a;
	if (w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff)) {
		w[0] = w[3];
		w[3] = 0;
		w[2] = 0;
	}
}

static __always_inline bool same_flow(const struct rst_flow *a, const struct rst_flow *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
#pragma unroll
	for (int i = 0; i < sizeof(*a) / 8; i++)
		if (x[i] != y[i])
			return false;
	return true;
}

static __always_inline struct rst_seen *seen_slot(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&rst_seen, &zero);
}

/* The flow of the RST segment a socket received: peer to local. */
static __always_inline void flow_of_sk(struct rst_flow *f, const struct sock_common *c)
{
	__builtin_memset(f, 0, sizeof(*f));
	f->netns = BPF_CORE_READ(c, skc_net.net, ns.inum);
	f->sport = bpf_ntohs(BPF_CORE_READ(c, skc_dport));
	f->dport = BPF_CORE_READ(c, skc_num);
	if (BPF_CORE_READ(c, skc_family) == AF_INET6) {
		copy_v6(f->saddr, &c->skc_v6_daddr);
		copy_v6(f->daddr, &c->skc_v6_rcv_saddr);
		unmap_v4(f->saddr);
		unmap_v4(f->daddr);
	} else {
		bpf_probe_read_kernel(f->saddr, 4, &c->skc_daddr);
		bpf_probe_read_kernel(f->daddr, 4, &c->skc_rcv_saddr);
	}
}

static __always_inline void remember(const struct sock_common *c, __u8 state, bool reported)
{
	struct rst_seen *s = seen_slot();
	if (!s)
		return;
	flow_of_sk(&s->flow, c);
	s->ts = bpf_ktime_get_ns();
	s->state = state;
	s->reported = reported;
}

/* A time-wait sock killed (inet_twsk_deschedule_put cancels its timer): by
 * a RST when its free follows on this CPU. Every timer cancelled on the
 * machine comes here: one load and compare for the others. */
SEC("tp_btf/timer_cancel")
int BPF_PROG(rst_tw_cancel, struct timer_list *timer)
{
	__u64 fn = (__u64)timer->function;

	/* A handshake in progress killed (tcp_check_req's embryonic reset:
	 * inet_csk_reqsk_queue_drop cancels the request sock's timer): by a
	 * RST when its free follows on this CPU. The free names the listener
	 * only; ss shows the request sock as SYN-RECV. */
	if (rst_cfg.req_timer_fn && fn == rst_cfg.req_timer_fn) {
		struct request_sock *req =
			(void *)timer - bpf_core_field_offset(struct request_sock, rsk_timer);
		if (nt_watched(BPF_CORE_READ(req, __req_common.skc_net.net, ns.inum)))
			remember(&req->__req_common, TCP_SYN_RECV, false);
		return 0;
	}
	if (!rst_cfg.tw_timer_fn || fn != rst_cfg.tw_timer_fn)
		return 0;
	struct inet_timewait_sock *tw =
		(void *)timer - bpf_core_field_offset(struct inet_timewait_sock, tw_timer);
	if (nt_watched(BPF_CORE_READ(tw, __tw_common.skc_net.net, ns.inum)))
		remember(&tw->__tw_common, BPF_CORE_READ(tw, tw_substate), false);
	return 0;
}

/* A TCP RST received in a watched namespace that tcp_receive_reset did not
 * report. `rx_sk`: the socket that dropped it (kfree_skb, 6.11+), or NULL. */
static __always_inline int on_free(void *ctx, const struct sk_buff *skb, const struct sock *rx_sk,
				   bool has_reason, __u32 reason)
{
	if (!skb || nt_idle() || !skb->skb_iif)  /* never received: one of ours, or not TCP's */
		return 0;
	const struct net_device *dev = skb->dev;
	const struct sock *owner = skb->sk;
	/* a capture's copy (tcpdump's), owned by its packet socket */
	if (owner && owner->__sk_common.skc_family == AF_PACKET)
		return 0;
	/* a segment a socket took has no device (tcp_v{4,6}_rcv clear it):
	 * the socket that dropped it (6.11+) names the namespace — a
	 * listener's RST, one out of a connection's window */
	if (!dev && !rx_sk)
		return 0;
	__u16 proto = bpf_ntohs(skb->protocol);
	if (proto != ETH_P_IP && proto != ETH_P_IPV6)
		return 0;
	__u32 netns = dev ? dev->nd_net.net->ns.inum : nt_netns_of_sk(rx_sk);
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 0;

	unsigned char *l3 = skb->head + skb->network_header;
	struct rst_flow f = { .netns = netns };
	struct tcphdr th;
	__u8 family;
	if (proto == ETH_P_IP) {
		struct iphdr ip;
		if (bpf_probe_read_kernel(&ip, sizeof(ip), l3) || ip.protocol != IPPROTO_TCP ||
		    (bpf_ntohs(ip.frag_off) & 0x1fff) ||
		    bpf_probe_read_kernel(&th, sizeof(th), l3 + ip.ihl * 4))
			return 0;
		family = 4;
		__builtin_memcpy(f.saddr, &ip.saddr, 4);
		__builtin_memcpy(f.daddr, &ip.daddr, 4);
	} else {
		struct ipv6hdr ip6;
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), l3) || ip6.nexthdr != IPPROTO_TCP ||
		    bpf_probe_read_kernel(&th, sizeof(th), l3 + sizeof(ip6)))
			return 0;
		family = 6;
		__builtin_memcpy(f.saddr, &ip6.saddr, 16);
		__builtin_memcpy(f.daddr, &ip6.daddr, 16);
	}
	if (!th.rst)
		return 0;
	f.sport = bpf_ntohs(th.source);
	f.dport = bpf_ntohs(th.dest);

	__u8 state = TCP_STATE_UNKNOWN;
	struct rst_seen *s = seen_slot();
	if (s && s->ts && bpf_ktime_get_ns() - s->ts < RST_MATCH_NS && same_flow(&s->flow, &f)) {
		s->ts = 0;
		if (s->reported)
			return 0;
		state = s->state;
	} else if (rx_sk) {
		state = BPF_CORE_READ(rx_sk, __sk_common.skc_state);
		if (state == TCP_TIME_WAIT)
			state = BPF_CORE_READ((struct inet_timewait_sock *)rx_sk, tw_substate);
	} else if (has_reason && rst_cfg.no_socket && reason == rst_cfg.no_socket) {
		state = TCP_CLOSE;
	}

	struct rst_event *e = nt_reserve(scope, NT_KIND_RST, struct rst_event);
	if (!e)
		return 0;
	nt_fill_hdr(&e->h, NT_KIND_RST, netns);
	e->origin = RST_ORIGIN_FREED;
	e->family = family;
	e->state = state;
	e->has_reason = 0;
	e->reason = 0;
	e->sport = f.sport;
	e->dport = f.dport;
	__builtin_memcpy(e->saddr, f.saddr, 16);
	__builtin_memcpy(e->daddr, f.daddr, 16);
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* 6.11+: kfree_skb(skb, location, reason, rx_sk) */
SEC("tp_btf/kfree_skb")
int BPF_PROG(rst_recv_drop_sk, struct sk_buff *skb, void *location)
{
	return on_free(ctx, skb, (const struct sock *)ctx[3], true, (__u32)ctx[2]);
}

/* 5.17 to 6.10: kfree_skb(skb, location, reason) */
SEC("tp_btf/kfree_skb")
int BPF_PROG(rst_recv_drop, struct sk_buff *skb, void *location)
{
	return on_free(ctx, skb, NULL, true, (__u32)ctx[2]);
}

SEC("tp_btf/consume_skb")
int BPF_PROG(rst_recv_consume, struct sk_buff *skb)
{
	return on_free(ctx, skb, NULL, false, 0);
}
