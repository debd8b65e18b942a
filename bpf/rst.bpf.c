// SPDX-License-Identifier: GPL-2.0
/* TCP resets, sent and received (seed 003: "who sent this RST, and why").
 *
 * Mechanisms, best first (the loader enables one set, see probes/rst.py):
 *  - tp_btf/tcp_send_reset with the reset reason (6.10+): covers both the
 *    reply to a segment (skb set) and an active abort (skb NULL);
 *  - on older kernels the tracepoint only reports active resets reliably,
 *    so replies come from fentry (or kprobe) on tcp_v{4,6}_send_reset;
 *  - tp_btf/tcp_receive_reset for resets the peer sent us.
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
#define TCP_CLOSE 7

/* Set by the loader before load. */
const volatile struct {
	__u32 tp_active_only; /* tracepoint: ignore replies (another program has them) */
} rst_cfg = {};

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
