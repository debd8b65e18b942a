// SPDX-License-Identifier: GPL-2.0
/* TCP retransmissions (seed: tcpretrans).
 *
 * tp_btf/tcp_retransmit_skb fires for every segment sent again: RTO and fast
 * retransmits, tail loss probes, SYNs. Since 6.14 it also fires for attempts
 * that failed before reaching the wire (third argument `err`); those are
 * skipped, so an event is a segment that was really sent again.
 * tp_btf/tcp_retransmit_synack covers a listener resending a SYN/ACK.
 */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "nettrace.h"
#include "retransmit.h"

NT_WIRE(retrans_event);

#define AF_INET6 10

/* Local and remote ends from a sock_common (a socket's or a request's). */
static __always_inline void fill_addrs(struct retrans_event *e, const struct sock_common *c, __u16 sport)
{
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	e->sport = sport;
	e->dport = bpf_ntohs(BPF_CORE_READ(c, skc_dport));
	if (BPF_CORE_READ(c, skc_family) == AF_INET6) {
		e->family = 6;
		bpf_probe_read_kernel(e->saddr, 16, &c->skc_v6_rcv_saddr);
		bpf_probe_read_kernel(e->daddr, 16, &c->skc_v6_daddr);
	} else {
		e->family = 4;
		bpf_probe_read_kernel(e->saddr, 4, &c->skc_rcv_saddr);
		bpf_probe_read_kernel(e->daddr, 4, &c->skc_daddr);
	}
}

/* An event for `owner` (a socket or a request) in a watched namespace, header
 * filled; NULL when the namespace is not watched or the ring is full. */
static __always_inline struct retrans_event *begin(__u32 netns, const void *owner, __u8 type)
{
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return NULL;
	struct retrans_event *e = nt_reserve(scope, NT_KIND_RETRANS, struct retrans_event);
	if (!e)
		return NULL;
	nt_fill_hdr(&e->h, NT_KIND_RETRANS, netns);
	e->sk = (__u64)owner;
	e->type = type;
	e->pad = 0;
	return e;
}

static __always_inline int on_segment(void *ctx, const struct sock *sk, const struct sk_buff *skb)
{
	if (!sk)
		return 0;
	struct retrans_event *e = begin(nt_netns_of_sk(sk), sk, RETRANS_SEGMENT);
	if (!e)
		return 0;
	e->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	e->total_retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	e->seq = 0;
	e->segs = 1;
	if (skb) {
		struct tcp_skb_cb *cb = (struct tcp_skb_cb *)&skb->cb[0];
		e->seq = BPF_CORE_READ(cb, seq);
		/* one retransmission can carry many segments (a GSO-sized skb of
		 * the write queue): the MIB's RetransSegs counts those */
		struct skb_shared_info *shinfo =
			(struct skb_shared_info *)(BPF_CORE_READ(skb, head) + BPF_CORE_READ(skb, end));
		__u16 segs = BPF_CORE_READ(shinfo, gso_segs);
		if (segs)
			e->segs = segs;
	}
	fill_addrs(e, &sk->__sk_common, bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport)));
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* 6.14+: tcp_retransmit_skb(sk, skb, err) */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_tp, const struct sock *sk, const struct sk_buff *skb)
{
	if ((int)ctx[2] != 0)
		return 0;  /* not sent: e.g. still queued in the host */
	return on_segment(ctx, sk, skb);
}

/* Before 6.14: tcp_retransmit_skb(sk, skb), only successful ones. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_tp_noerr, const struct sock *sk, const struct sk_buff *skb)
{
	return on_segment(ctx, sk, skb);
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(retrans_synack_tp, const struct sock *sk, const struct request_sock *req)
{
	if (!req)
		return 0;
	const struct sock_common *c = &req->__req_common;
	struct retrans_event *e = begin(BPF_CORE_READ(c, skc_net.net, ns.inum), req, RETRANS_SYNACK);
	if (!e)
		return 0;
	e->state = BPF_CORE_READ(c, skc_state);
	e->total_retrans = BPF_CORE_READ(req, num_retrans);
	e->seq = 0;
	e->segs = 1;
	fill_addrs(e, c, BPF_CORE_READ(c, skc_num));  /* a request's local port: skc_num */
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}
