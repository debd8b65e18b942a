// SPDX-License-Identifier: GPL-2.0
/* TCP connections opened and closed (seeds: tcp_connections.stp, tcplife).
 *
 * tp_btf/inet_sock_set_state sees every TCP state change:
 *  - CLOSE -> SYN_SENT runs in connect(), so the connector is current: we
 *    remember it (and the time) by socket address, and report it when the
 *    connection reaches ESTABLISHED (usually in softirq);
 *  - SYN_RECV -> ESTABLISHED is the server side, in softirq, before any
 *    process accepted it. The accepting process is found where accept()
 *    returns: tp_btf/sys_exit of accept/accept4 (fd -> file -> socket) or a
 *    kretprobe on inet_csk_accept (also sees io_uring and in-kernel
 *    accepts). Python joins the two records by socket address;
 *  - * -> CLOSE reports duration and bytes, like tcplife.
 *
 * A kernel stack costs ~0.8 us (most of what a state change cost): only a
 * close that ended no FIN exchange (reset, timeout, abort, refused connect)
 * takes one, where it says why. Whether the change ran in softirq, which
 * decides who is to blame, comes from conn_in_softirq instead.
 */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "nettrace.h"
#include "conn.h"

NT_WIRE(conn_event);
NT_WIRE(conn_stack_event);

#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_MPTCP 262
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT2 5
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10
#define TCP_CLOSING 11

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);   /* struct sock * */
	__type(value, struct conn_owner);
} conn_socks SEC(".maps");

/* 1 while this CPU runs softirqs, else 0. The preempt counter says it
 * directly but is a per-cpu variable BPF reads only as a typed ksym, which
 * needs CONFIG_KALLSYMS_ALL; two programs on the softirq tracepoints cost a
 * few ns per softirq instead (~4.5 softirqs per loopback connection). Set,
 * not counted, so a softirq half seen at attach cannot leave it wrong. On
 * PREEMPT_RT softirqs are preemptible: a task that runs meanwhile on the CPU
 * would be told softirq (it cannot take the softirq's BH lock, which TCP's
 * receive path needs, but a close() can change a state without it). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} conn_in_softirq SEC(".maps");

static __always_inline void set_in_softirq(__u32 on)
{
	__u32 zero = 0;
	__u32 *v = bpf_map_lookup_elem(&conn_in_softirq, &zero);
	if (v)
		*v = on;
}

SEC("tp_btf/softirq_entry")
int BPF_PROG(conn_softirq_entry, unsigned int vec_nr)
{
	set_in_softirq(1);
	return 0;
}

SEC("tp_btf/softirq_exit")
int BPF_PROG(conn_softirq_exit, unsigned int vec_nr)
{
	set_in_softirq(0);
	return 0;
}

static __always_inline bool in_softirq(void)
{
	__u32 zero = 0;
	__u32 *v = bpf_map_lookup_elem(&conn_in_softirq, &zero);
	return v && *v;
}

/* A socket's fields: `direct` (the tracepoint's BTF-typed socket) by plain
 * loads, else (a socket read out of an fd or a kretprobe's return value) by
 * bpf_probe_read. Each caller passes a constant: the other branch is
 * compiled out, and the state-change program, which runs ~10 times per
 * connection, makes one helper call (to reach the tcp_sock the struct sock
 * is part of: the verifier allows loads within the pointer's own type
 * only) instead of one per field. */
#define SK_READ(direct, ptr, ...) ((direct) ? (ptr)->__VA_ARGS__ : BPF_CORE_READ(ptr, __VA_ARGS__))

static __always_inline const struct tcp_sock *tcp_of(const struct sock *sk, bool direct)
{
	return direct ? bpf_skc_to_tcp_sock((void *)sk) : (const struct tcp_sock *)sk;
}

static __always_inline bool is_tcp(const struct sock *sk, bool direct)
{
	return (direct ? BPF_CORE_READ_BITFIELD(sk, sk_protocol) :
		BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol)) == IPPROTO_TCP;
}

static __always_inline __u32 netns_of_sk(const struct sock *sk, bool direct)
{
	return direct ? sk->__sk_common.skc_net.net->ns.inum : nt_netns_of_sk(sk);
}

static __always_inline void fill_addrs(struct conn_event *e, const struct sock *sk, const struct tcp_sock *tp,
				       bool direct)
{
	__u16 family = SK_READ(direct, sk, __sk_common.skc_family);

	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	/* inet_sport survives the unhash on the way to CLOSE; skc_num does not */
	e->sport = tp ? bpf_ntohs(SK_READ(direct, tp, inet_conn.icsk_inet.inet_sport)) : 0;
	e->dport = bpf_ntohs(SK_READ(direct, sk, __sk_common.skc_dport));
	if (family == AF_INET6) {
		e->family = 6;
		if (direct) {
			__builtin_memcpy(e->saddr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
			__builtin_memcpy(e->daddr, &sk->__sk_common.skc_v6_daddr, 16);
		} else {
			bpf_probe_read_kernel(e->saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
			bpf_probe_read_kernel(e->daddr, 16, &sk->__sk_common.skc_v6_daddr);
		}
	} else {
		e->family = 4;
		if (direct) {
			__builtin_memcpy(e->saddr, &sk->__sk_common.skc_rcv_saddr, 4);
			__builtin_memcpy(e->daddr, &sk->__sk_common.skc_daddr, 4);
		} else {
			bpf_probe_read_kernel(e->saddr, 4, &sk->__sk_common.skc_rcv_saddr);
			bpf_probe_read_kernel(e->daddr, 4, &sk->__sk_common.skc_daddr);
		}
	}
}

static __always_inline void fill(struct conn_event *e, const struct sock *sk, bool direct, __u32 netns,
				 __u8 action, int oldstate, int newstate, const struct conn_owner *owner)
{
	const struct tcp_sock *tp = tcp_of(sk, direct);

	nt_fill_hdr(&e->h, NT_KIND_CONN, netns);
	if (in_softirq())
		e->h.flags |= CONN_F_SOFTIRQ;
	e->sk = (__u64)sk;
	e->action = action;
	e->oldstate = oldstate;
	e->newstate = newstate;
	e->pad = 0;
	e->duration_ns = 0;
	e->bytes_acked = 0;
	e->bytes_received = 0;
	e->has_birth = owner != NULL;
	e->has_owner = owner && owner->has_owner;
	e->owner_pid = e->has_owner ? owner->pid : 0;
	e->owner_tid = e->has_owner ? owner->tid : 0;
	e->owner_uid = e->has_owner ? owner->uid : 0;
	__builtin_memset(e->owner_comm, 0, NT_COMM_LEN);
	if (e->has_owner)
		__builtin_memcpy(e->owner_comm, owner->comm, NT_COMM_LEN);
	if (action == CONN_CLOSE) {
		unsigned long flags = SK_READ(direct, sk, __sk_common.skc_flags);
		__u64 acked = tp ? SK_READ(direct, tp, bytes_acked) : 0;
		__u64 rcvd = tp ? SK_READ(direct, tp, bytes_received) : 0;

		if (owner)
			e->duration_ns = e->h.ts - owner->birth_ns;
		/* both count sequence space: take out our SYN (active open), our FIN
		 * once acknowledged, and the peer's FIN, to leave payload bytes.
		 * Our FIN went out only if the socket left a state that follows
		 * one (not the send shutdown: close() sets it also when it aborts
		 * with a RST, and MPTCP's subflows send theirs without it).
		 * The peer's FIN was taken in only if tcp_fin() ran: it sets
		 * SOCK_DONE. A read shutdown says nothing about it: close() sets
		 * one, and an orphan closes from FIN_WAIT2 before any FIN came. */
		bool fin_sent = oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 || oldstate == TCP_CLOSING ||
				oldstate == TCP_LAST_ACK || oldstate == TCP_TIME_WAIT;
		if (owner && owner->active && acked)
			acked--;
		if (fin_sent && acked && tp && SK_READ(direct, tp, snd_una) == SK_READ(direct, tp, write_seq))
			acked--;
		if ((flags & (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE))) && rcvd)
			rcvd--;
		e->bytes_acked = acked;
		e->bytes_received = rcvd;
	}
	fill_addrs(e, sk, tp, direct);
}

static __always_inline int emit(void *ctx, const struct sock *sk, bool direct, __u32 netns, struct nt_scope *scope,
				__u8 action, int oldstate, int newstate, const struct conn_owner *owner)
{
	/* a FIN exchange ends in FIN_WAIT2, TIME_WAIT, CLOSING or LAST_ACK */
	if (action == CONN_CLOSE && oldstate != TCP_FIN_WAIT2 && oldstate != TCP_TIME_WAIT &&
	    oldstate != TCP_CLOSING && oldstate != TCP_LAST_ACK) {
		struct conn_stack_event *e = nt_reserve(scope, NT_KIND_CONN, struct conn_stack_event);
		if (!e)
			return 0;
		fill((struct conn_event *)e, sk, direct, netns, action, oldstate, newstate, owner);
		e->h.flags |= CONN_F_STACK;
		nt_fill_stack(ctx, &e->h, e->stack);
		bpf_ringbuf_submit(e, 0);
		return 0;
	}
	struct conn_event *e = nt_reserve(scope, NT_KIND_CONN, struct conn_event);
	if (!e)
		return 0;
	fill(e, sk, direct, netns, action, oldstate, newstate, owner);
	e->h.stack_len = 0;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline void remember(__u64 key, bool with_task)
{
	struct conn_owner o = {};

	o.birth_ns = bpf_ktime_get_ns();
	if (with_task) {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		__u64 id = bpf_get_current_pid_tgid();
		o.pid = nt_ns_pid(task, id >> 32, true);
		o.tid = nt_ns_pid(task, (__u32)id, false);
		o.uid = (__u32)bpf_get_current_uid_gid();
		o.has_owner = 1;
		o.active = 1;
		bpf_get_current_comm(o.comm, sizeof(o.comm));
	}
	bpf_map_update_elem(&conn_socks, &key, &o, BPF_ANY);
}

static __always_inline int on_state(void *ctx, const struct sock *sk, int oldstate, int newstate)
{
	/* 4 of a connection's 10 changes (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
	 * LAST_ACK) are none of ours: they return before any read */
	if ((newstate != TCP_SYN_SENT && newstate != TCP_SYN_RECV && newstate != TCP_ESTABLISHED &&
	     newstate != TCP_CLOSE) || nt_idle() || !is_tcp(sk, true))
		return 0;
	__u32 netns = netns_of_sk(sk, true);
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 0;
	__u64 key = (__u64)sk;

	if (newstate == TCP_SYN_SENT) {
		remember(key, true);   /* connect(): the connector is current */
		return 0;
	}
	if (newstate == TCP_SYN_RECV) {
		/* a child socket of a listener, in softirq (it leaves LISTEN, the
		 * state it was cloned with); from SYN_SENT it is a simultaneous
		 * open (a socket connected to itself, or two connecting to each
		 * other): still the connector's connect, whose owner stays */
		if (oldstate != TCP_SYN_SENT)
			remember(key, false);
		return 0;
	}
	struct conn_owner *owner = bpf_map_lookup_elem(&conn_socks, &key);
	if (newstate == TCP_ESTABLISHED) {
		__u8 action;

		if (oldstate == TCP_SYN_SENT || (oldstate == TCP_SYN_RECV && owner && owner->active))
			action = CONN_CONNECT;
		else if (oldstate == TCP_SYN_RECV)
			action = CONN_ESTABLISHED;
		else
			return 0;
		/* one call: each inlined emit() is verified on its own (~4 ms) */
		return emit(ctx, sk, true, netns, scope, action, oldstate, newstate, owner);
	}
	if (newstate == TCP_CLOSE && oldstate != TCP_LISTEN && oldstate != TCP_CLOSE) {
		emit(ctx, sk, true, netns, scope, CONN_CLOSE, oldstate, newstate, owner);
		bpf_map_delete_elem(&conn_socks, &key);
	}
	return 0;
}

/* The kernel skips a tracing program's call when that program is already
 * running on the CPU: a state change in softirq (a SYN, a FIN) that
 * interrupts conn_state_tp handling one in a process (connect, close) is
 * not seen by it; at ~30k connections a second, 0.1-1% of connections.
 * conn_state_nested, on the same tracepoint, takes exactly the calls
 * conn_state_tp did not: conn_state_tp notes each call it takes first
 * thing (its arguments' address, the socket, the states), one note for
 * process context and one for softirq, so that the softirq that interrupts
 * a process's call between the two programs leaves that call's note; a
 * call whose note is not there is one the kernel skipped it for. (Calls
 * nest no deeper: a tracepoint runs its programs with preemption off, and
 * no state changes in hardirq. A flag set while conn_state_tp ran missed
 * the calls that came before it was set: most, for the changes it returns
 * from at once.) Python counts as lost only the skipped calls not made up
 * for (conn_covered). */
struct conn_call {
	__u64 args;
	__u64 sk;
	__u64 states;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);   /* 0: process context, 1: softirq */
	__type(key, __u32);
	__type(value, struct conn_call);
} conn_taken SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} conn_covered SEC(".maps");

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(conn_state_tp, const struct sock *sk, int oldstate, int newstate)
{
	__u32 context = in_softirq();
	struct conn_call *c = bpf_map_lookup_elem(&conn_taken, &context);
	if (c) {
		c->args = (__u64)ctx;
		c->sk = (__u64)sk;
		c->states = ((__u64)(__u32)oldstate << 32) | (__u32)newstate;
	}
	return on_state(ctx, sk, oldstate, newstate);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(conn_state_nested, const struct sock *sk, int oldstate, int newstate)
{
	__u32 context = in_softirq(), zero = 0;
	struct conn_call *c = bpf_map_lookup_elem(&conn_taken, &context);
	if (!c || (c->args == (__u64)ctx && c->sk == (__u64)sk &&
		   c->states == (((__u64)(__u32)oldstate << 32) | (__u32)newstate)))
		return 0;   /* conn_state_tp took it */
	__u64 *covered = bpf_map_lookup_elem(&conn_covered, &zero);
	if (covered)
		__sync_fetch_and_add(covered, 1);
	return on_state(ctx, sk, oldstate, newstate);
}

/* accept() returned sk to the current process. */
static __always_inline int on_accepted(void *ctx, const struct sock *sk)
{
	if (!sk || !is_tcp(sk, false))
		return 0;
	__u32 netns = netns_of_sk(sk, false);
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 0;
	__u64 key = (__u64)sk;
	struct conn_owner *owner = bpf_map_lookup_elem(&conn_socks, &key);
	if (owner && !owner->has_owner) {
		/* the close event names the acceptor as the owner (tcplife) */
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		__u64 id = bpf_get_current_pid_tgid();
		owner->pid = nt_ns_pid(task, id >> 32, true);
		owner->tid = nt_ns_pid(task, (__u32)id, false);
		owner->uid = (__u32)bpf_get_current_uid_gid();
		bpf_get_current_comm(owner->comm, sizeof(owner->comm));
		owner->has_owner = 1;
	}
	/* a passive open leaves SYN_RECV; with TCP Fast Open accept() can
	 * return before it has (the handshake's last ACK still to come) */
	return emit(ctx, sk, false, netns, scope, CONN_ACCEPTED, TCP_SYN_RECV, BPF_CORE_READ(sk, __sk_common.skc_state),
		    owner);
}

/* The syscall numbers of accept and accept4 on this machine, set by Python
 * (they differ between architectures) when the plan sees accepts at
 * sys_exit; `on` 0 (a kretprobe plan, or no conn probe): this part is off. */
const volatile struct {
	__s32 nr_accept;
	__s32 nr_accept4;
	__u32 on;
} conn_cfg = {};

/* Called by the syscall probe's tp_btf/sys_exit program (syscall.bpf.c) for
 * every syscall while something is watched: one program on that tracepoint
 * instead of two (a tracepoint with one program calls it directly; with two,
 * through an indirect loop: ~+50 ns on every syscall of the machine). No
 * tracefs needed, unlike the syscalls:sys_exit_accept* tracepoints. ret is
 * the new fd of an accept; its file's socket is the connection. */
__noinline int conn_on_sys_exit(long nr, long ret)
{
	if (!conn_cfg.on || (nr != conn_cfg.nr_accept && nr != conn_cfg.nr_accept4) || ret < 0)
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || ret >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[ret]) || !file)
		return 0;
	struct socket *sock = BPF_CORE_READ(file, private_data);
	if (!sock)
		return 0;
	struct sock *sk = BPF_CORE_READ(sock, sk);
	/* an MPTCP socket: the connection whose states were followed is its
	 * first subflow, a TCP socket */
	if (sk && bpf_core_type_exists(struct mptcp_sock) &&
	    BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) == IPPROTO_MPTCP)
		sk = BPF_CORE_READ((struct mptcp_sock *)sk, first);
	return on_accepted(NULL, sk);
}

SEC("kretprobe/inet_csk_accept")
int BPF_KRETPROBE(conn_accept_kretprobe, struct sock *sk)
{
	return on_accepted(ctx, sk);
}
