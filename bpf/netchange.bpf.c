// SPDX-License-Identifier: GPL-2.0
/* Who changed the network (seed 000, delip.stp): every rtnetlink notification
 * the kernel queues on a monitor socket the plugin owns in a watched
 * namespace is delivered in the context of the task that caused the change.
 * We record that task, its command line and the kernel stack, with a copy of
 * the message itself (what changed).
 *
 * Mechanisms: tp_btf/sk_data_ready (6.4+) fires right after the message is
 * queued, so the message is the queue's tail; fentry/kprobe on
 * __netlink_sendskb (older kernels) see the skb directly.
 */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "nettrace.h"
#include "netchange.h"

#define AF_NETLINK 16

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct nc_sock_key);
	__type(value, __u32);
} nc_socks SEC(".maps");

static __always_inline int nc_emit(void *ctx, const struct sock *sk, const struct sk_buff *skb)
{
	struct nc_sock_key key = {};

	if (BPF_CORE_READ(sk, __sk_common.skc_family) != AF_NETLINK)
		return 0;
	key.netns = nt_netns_of_sk(sk);
	key.portid = BPF_CORE_READ((struct netlink_sock *)sk, portid);
	if (!bpf_map_lookup_elem(&nc_socks, &key))
		return 0;
	struct nt_scope *scope = nt_watched(key.netns);
	if (!scope)
		return 0;
	struct netchange_event *e = nt_reserve(scope, NT_KIND_NLMSG, struct netchange_event);
	if (!e)
		return 0;

	nt_fill_hdr(&e->h, NT_KIND_NLMSG, key.netns);
	e->portid = key.portid;
	e->skb = (__u64)skb;
	e->msg_len = 0;
	e->copied = 0;
	if (skb) {
		__u32 len = BPF_CORE_READ(skb, len);
		/* clamp then mask: a bound the verifier can follow (max - 1 bytes) */
		__u64 n = len > NC_MSG_MAX - 1 ? NC_MSG_MAX - 1 : len;
		n &= NC_MSG_MAX - 1;
		e->msg_len = len;
		if (n && bpf_probe_read_kernel(e->msg, n, BPF_CORE_READ(skb, data)) == 0)
			e->copied = n;
	}

	/* The command line, read now: a short-lived `ip` is gone by the time
	 * anyone looks at /proc. Kernel threads have no mm. */
	e->cmdline_len = 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	if (mm && !(e->h.flags & NT_F_KTHREAD)) {
		unsigned long start = BPF_CORE_READ(mm, arg_start);
		unsigned long end = BPF_CORE_READ(mm, arg_end);
		__u64 n = end > start ? end - start : 0;
		if (n > NC_CMDLINE_MAX - 1)
			n = NC_CMDLINE_MAX - 1;
		n &= NC_CMDLINE_MAX - 1;
		if (n && bpf_probe_read_user(e->cmdline, n, (void *)start) == 0)
			e->cmdline_len = n;
	}
	nt_fill_stack(ctx, &e->h, e->stack);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sk_data_ready")
int BPF_PROG(netchange_tp, const struct sock *sk)
{
	/* Only netlink sockets in our map get past the first checks; the
	 * message just queued is the tail of the receive queue. */
	if (BPF_CORE_READ(sk, __sk_common.skc_family) != AF_NETLINK)
		return 0;
	struct sk_buff *tail = BPF_CORE_READ(sk, sk_receive_queue.prev);
	void *head = (void *)sk + bpf_core_field_offset(struct sock, sk_receive_queue);
	/* an empty queue (nothing to copy) is recorded without content and
	 * counted as lost in Python: something changed, we cannot say what */
	return nc_emit(ctx, sk, (void *)tail == head ? NULL : tail);
}

SEC("fentry/__netlink_sendskb")
int BPF_PROG(netchange_fentry, struct sock *sk, struct sk_buff *skb)
{
	return nc_emit(ctx, sk, skb);
}

SEC("kprobe/__netlink_sendskb")
int BPF_KPROBE(netchange_kprobe, struct sock *sk, struct sk_buff *skb)
{
	return nc_emit(ctx, sk, skb);
}
