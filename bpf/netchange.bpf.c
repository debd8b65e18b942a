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
 *
 * IPv6 addresses are announced (and removed after a DAD failure) by the
 * kernel's DAD worker, addrconf_dad_work, not by the task that added them.
 * The workqueue/timer tracepoints below remember who queued each DAD work;
 * what the worker then announces carries that task (NC_F_QUEUED_BY).
 */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "nettrace.h"
#include "netchange.h"

NT_WIRE(netchange_event);
NT_WIRE(nftchange_event);

#define AF_NETLINK 16

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct nc_sock_key);
	__type(value, struct nc_sock);
} nc_socks SEC(".maps");

/* Set by the loader from /proc/kallsyms; zero turns DAD tracking off. */
const volatile struct {
	__u64 dad_work_fn;    /* addrconf_dad_work */
	__u64 timer_fn;       /* delayed_work_timer_fn */
	__u64 expiry_lo;      /* call_timer_fn ... */
	__u64 expiry_hi;      /* ... up to the next symbol */
	__u64 softirq_lo;     /* handle_softirqs (__do_softirq before 6.9) ... */
	__u64 softirq_hi;     /* ... up to the next symbol */
} nc_cfg = {};

/* DAD work (its address) -> who queued it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct nc_origin);
} nc_work_origin SEC(".maps");

/* Worker thread (tid) -> the DAD work it is running. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} nc_running SEC(".maps");

/* An nc_origin is too big for the BPF stack: slot 0 for a queued work's
 * origin, slot 1 for the stack of a notification sent from a worker. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct nc_origin);
} nc_scratch SEC(".maps");

/* The current task's command line, read now: a short-lived `ip` is gone by
 * the time anyone looks at /proc. Kernel threads have no mm. */
static __always_inline __u32 nc_read_cmdline(char *buf, __u16 hdr_flags)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct mm_struct *mm = BPF_CORE_READ(task, mm);

	if (!mm || (hdr_flags & NT_F_KTHREAD))
		return 0;
	unsigned long start = BPF_CORE_READ(mm, arg_start);
	unsigned long end = BPF_CORE_READ(mm, arg_end);
	__u64 n = end > start ? end - start : 0;
	if (n > NC_CMDLINE_MAX - 1)
		n = NC_CMDLINE_MAX - 1;
	n &= NC_CMDLINE_MAX - 1;
	if (n && bpf_probe_read_user(buf, n, (void *)start) == 0)
		return n;
	return 0;
}

/* What a stack in nc_scratch runs through, found by bpf_loop (5.17+): its
 * callback is verified once, where an open-coded loop over the frames cost
 * milliseconds of verification in each program that has it. */
#define NC_THROUGH_EXPIRY 0x1   /* call_timer_fn: a timer fired */
#define NC_THROUGH_SOFTIRQ 0x2  /* handle_softirqs: interrupt context */

struct nc_scan {
	__u32 slot;     /* which nc_scratch holds the stack */
	__u32 frames;
	__u32 found;
};

static long nc_scan_frame(__u32 i, struct nc_scan *s)
{
	__u32 slot = s->slot;
	struct nc_origin *o = bpf_map_lookup_elem(&nc_scratch, &slot);

	__u64 a = 0;

	if (!o || i >= s->frames || i >= NT_MAX_STACK)
		return 1;
	/* (a helper read: clang merges the two bounds into one the verifier
	 * cannot follow) */
	bpf_probe_read_kernel(&a, sizeof(a), &o->stack[i]);
	if (a >= nc_cfg.expiry_lo && a < nc_cfg.expiry_hi)
		s->found |= NC_THROUGH_EXPIRY;
	if (a >= nc_cfg.softirq_lo && a < nc_cfg.softirq_hi)
		s->found |= NC_THROUGH_SOFTIRQ;
	return 0;
}

/* DAD work `work` is being queued (or its timer armed): if it belongs to a
 * watched namespace, remember who did it. The stack goes along: Python tells
 * from it whether a process or an interrupt (a DAD failure seen in a
 * received packet) queued it. */
static __always_inline void nc_remember(void *ctx, struct work_struct *work)
{
	struct inet6_ifaddr *ifp = (void *)work - bpf_core_field_offset(struct inet6_ifaddr, dad_work)
				   - bpf_core_field_offset(struct delayed_work, work);
	__u32 netns = BPF_CORE_READ(ifp, idev, dev, nd_net.net, ns.inum);
	if (!nt_watched(netns))
		return;
	__u64 key = (__u64)work;
	__u32 zero = 0;
	struct nc_origin *o = bpf_map_lookup_elem(&nc_scratch, &zero);
	if (!o)
		return;
	o->h.stack_len = bpf_get_stack(ctx, o->stack, sizeof(o->stack), 0);
	struct nc_scan scan = { .slot = 0, .frames = o->h.stack_len > 0 ? (__u32)o->h.stack_len / 8 : 0 };
	bpf_loop(NT_MAX_STACK, nc_scan_frame, &scan, 0);
	/* A delayed work's timer fired and queues it (the stack runs through
	 * call_timer_fn; delayed_work_timer_fn tail-calls __queue_work): the
	 * one who armed the timer stays. */
	if (scan.found & NC_THROUGH_EXPIRY)
		return;
	/* The worker re-arming its own work keeps the origin, unless a softirq
	 * running on top of the worker did it (a DAD failure: the probe the
	 * worker sent was answered at once); that softirq becomes the origin. */
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *running = bpf_map_lookup_elem(&nc_running, &tid);
	if (running && *running == key && !(scan.found & NC_THROUGH_SOFTIRQ))
		return;
	nt_fill_hdr(&o->h, NT_KIND_NLMSG, netns);
	o->cmdline_len = nc_read_cmdline(o->cmdline, o->h.flags);
	o->pad = 0;
	/* a sysctl write queued it (disable_ipv6=0 re-adding the link-local
	 * address): the write is over by the time the worker announces it */
	struct sysctl_write *w = bpf_map_lookup_elem(&nt_sysctl_writing, &tid);
	if (w)
		bpf_probe_read_kernel(&o->sysctl, sizeof(o->sysctl), w);
	else
		o->sysctl.name[0] = 0;
	bpf_map_update_elem(&nc_work_origin, &key, o, BPF_ANY);
}

SEC("tp_btf/workqueue_queue_work")
int BPF_PROG(nc_queue_work, int req_cpu, struct pool_workqueue *pwq, struct work_struct *work)
{
	/* every work queued on the machine passes here: a plain load, no helper */
	if (nc_cfg.dad_work_fn && (__u64)work->func == nc_cfg.dad_work_fn)
		nc_remember(ctx, work);
	return 0;
}

SEC("tp_btf/timer_start")
int BPF_PROG(nc_timer_start, struct timer_list *timer)
{
	/* every timer of the machine passes here: a plain load and one compare */
	if (!nc_cfg.timer_fn || (__u64)timer->function != nc_cfg.timer_fn)
		return 0;
	struct delayed_work *dwork = (void *)timer - bpf_core_field_offset(struct delayed_work, timer);
	struct work_struct *work = (void *)dwork + bpf_core_field_offset(struct delayed_work, work);
	if ((__u64)BPF_CORE_READ(work, func) == nc_cfg.dad_work_fn)
		nc_remember(ctx, work);
	return 0;
}

SEC("tp_btf/workqueue_execute_start")
int BPF_PROG(nc_work_start, struct work_struct *work)
{
	if (!nc_cfg.dad_work_fn || (__u64)work->func != nc_cfg.dad_work_fn)
		return 0;
	__u64 key = (__u64)work;
	if (!bpf_map_lookup_elem(&nc_work_origin, &key))
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&nc_running, &tid, &key, BPF_ANY);
	return 0;
}

SEC("tp_btf/workqueue_execute_end")
int BPF_PROG(nc_work_end, struct work_struct *work)
{
	/* (the function argument is not readable from tp_btf; the work may be
	 * freed by now, so only its address is compared) */
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *running = bpf_map_lookup_elem(&nc_running, &tid);
	if (running && *running == (__u64)work)
		bpf_map_delete_elem(&nc_running, &tid);
	return 0;
}

/* The event is announced by a DAD worker: make it carry who queued the work.
 * Not when a softirq running on top of the worker sent it (a router
 * advertisement received meanwhile): that is not the work's doing. Called
 * with the event's own stack in place. */
static __always_inline bool nc_queued_by(struct netchange_event *e)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *work = bpf_map_lookup_elem(&nc_running, &tid);
	if (!work)
		return false;
	struct nc_origin *o = bpf_map_lookup_elem(&nc_work_origin, work);
	__u32 one = 1;
	struct nc_origin *own = bpf_map_lookup_elem(&nc_scratch, &one);
	if (!o || !own)
		return false;
	own->h.stack_len = e->h.stack_len;
	bpf_probe_read_kernel(own->stack, sizeof(own->stack), e->stack);
	struct nc_scan scan = { .slot = 1, .frames = e->h.stack_len > 0 ? (__u32)e->h.stack_len / 8 : 0 };
	bpf_loop(NT_MAX_STACK, nc_scan_frame, &scan, 0);
	if (scan.found & NC_THROUGH_SOFTIRQ)
		return false;
	__u64 ts = e->h.ts;
	__u32 netns = e->h.netns;
	bpf_probe_read_kernel(&e->h, sizeof(e->h), &o->h);
	e->h.ts = ts;
	e->h.netns = netns;
	e->h.kind = NT_KIND_NLMSG;
	e->h.flags |= NC_F_QUEUED_BY;
	bpf_probe_read_kernel(e->cmdline, sizeof(e->cmdline), o->cmdline);
	e->cmdline_len = o->cmdline_len;
	bpf_probe_read_kernel(e->stack, sizeof(e->stack), o->stack);
	bpf_probe_read_kernel(&e->sysctl, sizeof(e->sysctl), &o->sysctl);
	return true;
}

/* A notification on the nftables monitor socket: the task, its command line,
 * the stack and the whole batch of messages (no DAD worker, no sysctl). */
static __noinline int nc_emit_nft(void *ctx, struct nt_scope *scope, __u32 netns, __u32 portid,
				  const struct sk_buff *skb)
{
	struct nftchange_event *e = nt_reserve(scope, NT_KIND_NLMSG, struct nftchange_event);
	if (!e)
		return 0;
	nt_fill_hdr(&e->h, NT_KIND_NLMSG, netns);
	e->h.flags |= NC_F_NFT;
	e->portid = portid;
	e->skb = (__u64)skb;
	e->msg_len = 0;
	e->copied = 0;
	if (skb) {
		__u32 len = BPF_CORE_READ(skb, len);
		__u64 n = len > NC_NFT_MSG_MAX - 1 ? NC_NFT_MSG_MAX - 1 : len;
		n &= NC_NFT_MSG_MAX - 1;
		e->msg_len = len;
		if (n && bpf_probe_read_kernel(e->msg, n, BPF_CORE_READ(skb, data)) == 0)
			e->copied = n;
	}
	nt_fill_stack(ctx, &e->h, e->stack);
	e->cmdline_len = nc_read_cmdline(e->cmdline, e->h.flags);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* This architecture's numbers of the system calls a netlink request is sent
 * with, and where the call's number is kept (the user registers saved at
 * entry: bpf_task_pt_regs, 5.15+). */
#define NETLINK_ROUTE 0
#if defined(__TARGET_ARCH_x86)
#define NC_NR_WRITE 1
#define NC_NR_SENDTO 44
#define NC_NR_SENDMSG 46
#define NC_SYSCALL_NR(regs) BPF_CORE_READ(regs, orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define NC_NR_WRITE 64
#define NC_NR_SENDTO 206
#define NC_NR_SENDMSG 211
#define NC_SYSCALL_NR(regs) BPF_CORE_READ(regs, syscallno)
#else
#define NC_NR_WRITE -1
#define NC_NR_SENDTO -1
#define NC_NR_SENDMSG -1
#define NC_SYSCALL_NR(regs) -2
#endif

/* The NETLINK_ROUTE socket behind the current task's descriptor `fd`, or NULL. */
static __always_inline struct sock *nc_rtnl_sock(struct task_struct *task, __u64 fd)
{
	struct file *f = nt_task_file(task, fd);
	if (!f)
		return NULL;
	/* a socket and its file point at each other; another file's
	 * private_data is something else */
	struct socket *sock = BPF_CORE_READ(f, private_data);
	if (!sock || BPF_CORE_READ(sock, file) != f)
		return NULL;
	struct sock *sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, __sk_common.skc_family) != AF_NETLINK ||
	    BPF_CORE_READ(sk, sk_protocol) != NETLINK_ROUTE)
		return NULL;
	return sk;
}

/* The request the current task is sending, when a notification is queued
 * under its system call (r is zeroed: it stays so for none): the buffer is
 * the task's own memory, still there while the kernel handles it. */
static __always_inline void nc_read_request(struct nc_request *r)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	long nr = NC_SYSCALL_NR(regs);
	__u64 buf = PT_REGS_PARM2_CORE_SYSCALL(regs);
	__u64 size = PT_REGS_PARM3_CORE_SYSCALL(regs);
	__u64 len = size;

	if (nr == NC_NR_SENDMSG) {
		struct user_msghdr m = {};
		struct iovec iov = {};
		if (bpf_probe_read_user(&m, sizeof(m), (void *)buf) ||
		    bpf_probe_read_user(&iov, sizeof(iov), m.msg_iov))
			return;
		buf = (__u64)iov.iov_base;
		size = iov.iov_len;
		/* (the whole of several buffers is not added up) */
		len = m.msg_iovlen == 1 ? size : 0;
	} else if (nr != NC_NR_SENDTO && nr != NC_NR_WRITE) {
		return;
	}
	struct sock *sk = nc_rtnl_sock(task, PT_REGS_PARM1_CORE_SYSCALL(regs));
	if (!sk)
		return;
	r->netns = nt_netns_of_sk(sk);
	r->len = len > 0xffffffff ? 0 : len;
	/* the start of a long buffer, or all of a short one (a bound the
	 * verifier can follow) */
	if (size >= NC_REQ_MAX) {
		if (bpf_probe_read_user(r->msg, NC_REQ_MAX, (void *)buf) == 0)
			r->copied = NC_REQ_MAX;
	} else {
		/* the mask kept where the call's length is (clang would drop
		 * it, knowing size < NC_REQ_MAX, and reload size from the stack:
		 * a value 6.1's verifier does not know bounded there) */
		__u64 n = size;
		barrier_var(n);
		n &= NC_REQ_MAX - 1;
		if (n && bpf_probe_read_user(r->msg, n, (void *)buf) == 0)
			r->copied = n;
	}
}

/* Whether the kernel sent `skb`: any process may unicast a made-up message to
 * a monitor socket (its port id is in /proc/net/netlink), or multicast one
 * with CAP_NET_ADMIN. The sender's port id is in the skb's netlink control
 * block (NETLINK_CB); the kernel's is 0, for notifications as for replies. */
static __always_inline bool nc_from_kernel(const struct sk_buff *skb)
{
	__u32 sender = 1;
	void *cb = (void *)skb + bpf_core_field_offset(struct sk_buff, cb);

	bpf_probe_read_kernel(&sender, sizeof(sender), cb + bpf_core_field_offset(struct netlink_skb_parms, portid));
	return sender == 0;
}

static __always_inline int nc_emit(void *ctx, const struct sock *sk, const struct sk_buff *skb)
{
	struct nc_sock_key key = {};

	if (BPF_CORE_READ(sk, __sk_common.skc_family) != AF_NETLINK)
		return 0;
	key.netns = nt_netns_of_sk(sk);
	key.portid = BPF_CORE_READ((struct netlink_sock *)sk, portid);
	struct nc_sock *ours = bpf_map_lookup_elem(&nc_socks, &key);
	if (!ours)
		return 0;
	if (skb) {
		/* every message queued on it, a forged one too: the receive memory counts them all */
		__sync_fetch_and_add(&ours->charged, BPF_CORE_READ(skb, truesize));
		if (!nc_from_kernel(skb))
			return 0;
	}
	struct nt_scope *scope = nt_watched(key.netns);
	if (!scope)
		return 0;
	if (ours->which == NC_SOCK_NFT)
		return nc_emit_nft(ctx, scope, key.netns, key.portid, skb);
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

	nt_fill_stack(ctx, &e->h, e->stack);
	e->req.netns = 0;
	e->req.len = 0;
	e->req.copied = 0;
	e->req.pad = 0;
	if (!nc_queued_by(e)) {
		e->cmdline_len = nc_read_cmdline(e->cmdline, e->h.flags);
		/* only a link's notification is weighed against the request (the
		 * rest of the program runs for every notification: kept short) */
		__u16 type = e->copied >= 6 ? *(__u16 *)(e->msg + 4) : 0;
		if (!(e->h.flags & NT_F_KTHREAD) && (type == RTM_NEWLINK || type == RTM_DELLINK))
			nc_read_request(&e->req);
		/* a change a sysctl write made (disable_ipv6=1 removing
		 * addresses): which setting, from sysctl.bpf.c */
		__u32 tid = (__u32)bpf_get_current_pid_tgid();
		struct sysctl_write *w = bpf_map_lookup_elem(&nt_sysctl_writing, &tid);
		if (w)
			bpf_probe_read_kernel(&e->sysctl, sizeof(e->sysctl), w);
		else
			e->sysctl.name[0] = 0;
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/sk_data_ready")
int BPF_PROG(netchange_tp, const struct sock *sk)
{
	/* Only netlink sockets in our map get past the first checks; the
	 * message just queued is the tail of the receive queue. */
	if (nt_idle())
		return 0;
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
