// SPDX-License-Identifier: GPL-2.0
/* TCP retransmissions (seed: tcpretrans).
 *
 * tp_btf/tcp_retransmit_skb fires for every segment sent again: RTO and fast
 * retransmits, tail loss probes, SYNs. Since 6.14 it fires for failed attempts
 * too (third argument `err`). __tcp_retransmit_skb counts a retransmission
 * (TcpRetransSegs, tcp_sock.total_retrans) after its own checks and before
 * the transmit: an attempt that failed a check (-EBUSY: the last copy still in
 * the host's queues; -EAGAIN, -ENOMEM, -EHOSTUNREACH, -EINVAL) is no
 * retransmission and no event, one whose transmit failed (a netfilter drop on
 * output: -EPERM; a qdisc drop: NET_XMIT_DROP) is one, with its `err`.
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
#define EAGAIN 11
#define ENOMEM 12
#define EBUSY 16
#define EINVAL 22
#define EHOSTUNREACH 113

/* A socket's total_retrans after its last attempt the probe saw (6.14+): a
 * failed attempt was counted iff it grew. On the socket, gone with it. */
struct retrans_seen {
	__u32 total_retrans;
	__u32 known;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct retrans_seen);
} retrans_seen SEC(".maps");

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

/* Whether the kernel counted a failed attempt: by total_retrans when the
 * probe saw the socket's previous attempt; else by the error, which the
 * checks before the count return (tcp_disconnect zeroes total_retrans). */
static __always_inline bool counted(int err, __u32 total, const struct retrans_seen *seen)
{
	if (!total)
		return false;
	if (seen && seen->known)
		return total != seen->total_retrans;
	return err != -EBUSY && err != -EAGAIN && err != -ENOMEM && err != -EHOSTUNREACH && err != -EINVAL;
}

static __always_inline int on_segment(void *ctx, const struct sock *sk, const struct sk_buff *skb, int err)
{
	if (!sk)
		return 0;
	struct retrans_event *e = begin(nt_netns_of_sk(sk), sk, RETRANS_SEGMENT);
	if (!e)
		return 0;
	e->state = BPF_CORE_READ(sk, __sk_common.skc_state);
	e->total_retrans = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	e->err = err;
	e->seq = 0;
	e->segs = 1;
	if (skb) {
		struct tcp_skb_cb *cb = (struct tcp_skb_cb *)&skb->cb[0];
		e->seq = BPF_CORE_READ(cb, seq);
		/* one retransmission can carry many segments (a GSO-sized skb of
		 * the write queue): tcp_skb_pcount, what TcpRetransSegs adds (the
		 * skb's gso_segs is only set by a transmit that got that far) */
		__u16 segs = BPF_CORE_READ(cb, tcp_gso_segs);
		if (segs)
			e->segs = segs;
	}
	fill_addrs(e, &sk->__sk_common, bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport)));
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* 6.14+: tcp_retransmit_skb(sk, skb, err), every attempt */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_tp, struct sock *sk, const struct sk_buff *skb, int err)
{
	if (!sk || !nt_watched(nt_netns_of_sk(sk)))
		return 0;
	__u32 total = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	struct retrans_seen *seen = bpf_sk_storage_get(&retrans_seen, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	bool retransmitted = !err || counted(err, total, seen);
	if (seen) {
		seen->total_retrans = total;
		seen->known = 1;
	}
	return retransmitted ? on_segment(ctx, sk, skb, err) : 0;
}

/* Before 6.14: tcp_retransmit_skb(sk, skb), only successful ones. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_tp_noerr, const struct sock *sk, const struct sk_buff *skb)
{
	return on_segment(ctx, sk, skb, 0);
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
	e->err = 0;
	e->seq = 0;
	e->segs = 1;
	fill_addrs(e, c, BPF_CORE_READ(c, skc_num));  /* a request's local port: skc_num */
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}
