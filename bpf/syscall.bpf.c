// SPDX-License-Identifier: GPL-2.0
/* Network system calls (seed 002: strace -e trace=network) of the tasks in
 * a watched namespace — what the test started there, and their children.
 *
 * tp_btf/sys_enter + sys_exit: one program on every syscall machine-wide,
 * which returns after one array lookup unless the number is a network call
 * (per-syscall tracepoints cost ~70 ms each to attach, 38 of them, and save
 * nothing measurable: see probes/syscall.py). Entry keeps the arguments and
 * input sockaddrs per thread; exit emits one event with the result and the
 * duration. */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "nettrace.h"
#include "syscall.h"

/* The call's arguments. x86: direct loads through the tracepoint's BTF-typed
 * pt_regs (no helper call); arm64's first argument is orig_x0, which libbpf
 * reads through CO-RE. libbpf 1.1 stops at the fifth argument. */
#if defined(__TARGET_ARCH_x86)
#define SC_ARGS(a, regs)                                                        \
	do {                                                                    \
		(a)[0] = (regs)->di;                                            \
		(a)[1] = (regs)->si;                                            \
		(a)[2] = (regs)->dx;                                            \
		(a)[3] = (regs)->r10;                                           \
		(a)[4] = (regs)->r8;                                            \
		(a)[5] = (regs)->r9;                                            \
	} while (0)
#else
#if defined(__TARGET_ARCH_arm64)
#define SC_PARM6(regs) BPF_CORE_READ((struct user_pt_regs *)(regs), regs[5])
#else
#define SC_PARM6(regs) 0
#endif
#define SC_ARGS(a, regs)                                                        \
	do {                                                                    \
		(a)[0] = PT_REGS_PARM1_CORE_SYSCALL(regs);                      \
		(a)[1] = PT_REGS_PARM2_CORE_SYSCALL(regs);                      \
		(a)[2] = PT_REGS_PARM3_CORE_SYSCALL(regs);                      \
		(a)[3] = PT_REGS_PARM4_CORE_SYSCALL(regs);                      \
		(a)[4] = PT_REGS_PARM5_CORE_SYSCALL(regs);                      \
		(a)[5] = SC_PARM6(regs);                                        \
	} while (0)
#endif

#define S_IFMT 00170000
#define S_IFSOCK 0140000

const volatile struct {
	__u32 self_tgid;  /* the pytest process: its helper threads are not the test's processes */
} sc_cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SC_MAX_NR);
	__type(key, __u32);
	__type(value, __u8);     /* enum sc_code, 0: not traced; filled by Python */
} sc_wanted SEC(".maps");

struct sc_pending {
	struct syscall_event e;  /* filled at entry, completed at exit */
	__u32 netns;             /* 0: no call in flight */
	__u32 pad;
};

/* The call in flight, per thread: task storage, not a hash by tid (no
 * update and delete per call, and gone with the thread). An entry left by a
 * call whose exit came while nothing was watched is ignored by its time. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sc_pending);
} sc_inflight SEC(".maps");

static __always_inline void copy_addr(struct syscall_event *e, __u64 uaddr, __u64 len)
{
	if (!uaddr || (__s64)len <= 0)
		return;
	if (len > SC_ADDR_MAX)
		len = SC_ADDR_MAX;
	if (!bpf_probe_read_user(e->addr, len & 0xff, (void *)uaddr))
		e->addr_len = len;
}

/* sockaddr behind a user_msghdr (msg_name, msg_namelen) */
static __always_inline void copy_msg_addr(struct syscall_event *e, __u64 umsg)
{
	struct { __u64 name; __s32 namelen; } hdr = {};
	if (umsg && !bpf_probe_read_user(&hdr, sizeof(hdr), (void *)umsg))
		copy_addr(e, hdr.name, hdr.namelen);
}

static __always_inline bool fd_is_socket(struct task_struct *task, __u64 fd)
{
	struct file *f = nt_task_file(task, fd);
	return f && (BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) == S_IFSOCK;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(sc_enter, struct pt_regs *regs, long id)
{
	if (nt_idle())
		return 0;
	__u32 nr = id;
	__u8 *code = bpf_map_lookup_elem(&sc_wanted, &nr);
	if (!code || !*code)
		return 0;
	if (nt_current_ns_tgid() == sc_cfg.self_tgid)  /* as os.getpid() sees it */
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	/* read, not loaded: a pointer loaded through a trusted one (the task)
	 * costs the verifier four searches of the kernel's whole BTF (~1 ms);
	 * three reads cost ~40 ns a wanted call */
	__u32 netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	if (!nt_watched(netns))
		return 0;

	struct sc_pending *p = bpf_task_storage_get(&sc_inflight, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!p) {
		struct nt_scope *scope = nt_watched(netns);
		if (scope)
			__sync_fetch_and_add(&scope->lost[NT_KIND_SYSCALL], 1);
		return 0;
	}
	p->netns = 0;
	struct syscall_event *e = &p->e;
	e->code = *code;
	SC_ARGS(e->args, regs);
	e->addr_len = 0;
	e->has_value = 0;
	e->value = e->value2 = 0;
	if (e->code == SC_CLOSE && !fd_is_socket(task, e->args[0]))
		return 0;  /* close of a file, a pipe...: not network */

	switch (e->code) {
	case SC_CONNECT:
	case SC_BIND:
		copy_addr(e, e->args[1], e->args[2]);
		break;
	case SC_SENDTO:
		copy_addr(e, e->args[4], e->args[5]);
		break;
	case SC_SENDMSG:
		copy_msg_addr(e, e->args[1]);
		break;
	case SC_SETSOCKOPT:
		/* the option's value, as strace shows it: addr holds its bytes */
		copy_addr(e, e->args[3], e->args[4]);
		break;
	case SC_GETSOCKOPT:
		/* the room the caller gave; the exit reads what the kernel filled */
		if (e->args[4] && !bpf_probe_read_user(&e->value2, sizeof(e->value2), (void *)e->args[4]))
			e->has_value = 1;
		break;
	case SC_ACCEPT:
	case SC_ACCEPT4:
	case SC_GETSOCKNAME:
	case SC_GETPEERNAME:
	case SC_RECVFROM: {
		/* the room the caller gave for the address (strace's [in => out]) */
		__u64 lenp = e->code == SC_RECVFROM ? e->args[5] : e->args[2];
		if (lenp && !bpf_probe_read_user(&e->value2, sizeof(e->value2), (void *)lenp))
			e->has_value = 1;
		break;
	}
	}
	e->h.ts = bpf_ktime_get_ns();
	p->netns = netns;
	return 0;
}

/* conn.bpf.c: accept()s for the conn probe (off unless its plan wants them);
 * sysctl.bpf.c: how the writes of sysctl events returned (likewise) */
extern int conn_on_sys_exit(long nr, long ret);
extern int sysctl_on_sys_exit(long nr, long ret);

SEC("tp_btf/sys_exit")
int BPF_PROG(sc_exit, struct pt_regs *regs, long ret)
{
	/* entries of a namespace no longer watched are purged by the engine */
	if (nt_idle())
		return 0;
	long nr = NT_SYSCALL_NR(regs);
	conn_on_sys_exit(nr, ret);
	sysctl_on_sys_exit(nr, ret);
	if (nr >= 0) {
		__u32 key = nr;
		__u8 *code = bpf_map_lookup_elem(&sc_wanted, &key);
		if (!code || !*code)
			return 0;
	}
	struct sc_pending *p = bpf_task_storage_get(&sc_inflight, bpf_get_current_task_btf(), 0, 0);
	if (!p || !p->netns)
		return 0;
	__u32 netns = p->netns;
	p->netns = 0;
	struct nt_scope *scope = nt_watched(netns);
	/* entered before this watch began: a call of an earlier one */
	if (!scope || p->e.h.ts < scope->since)
		return 0;
	struct syscall_event *e = nt_reserve(scope, NT_KIND_SYSCALL, struct syscall_event);
	if (!e)
		return 0;
	__u64 start = p->e.h.ts;
	__builtin_memcpy(e, &p->e, sizeof(*e));
	nt_fill_hdr(&e->h, NT_KIND_SYSCALL, netns);
	e->h.stack_len = 0;
	e->ret = ret;
	e->duration = e->h.ts - start;
	if (ret >= 0) {
		__u64 lenp = 0;
		__s32 len = 0;
		switch (e->code) {
		case SC_ACCEPT:
		case SC_ACCEPT4:
		case SC_GETSOCKNAME:
		case SC_GETPEERNAME:
			lenp = e->args[2];
			break;
		case SC_RECVFROM:
			lenp = e->args[5];
			break;
		case SC_RECVMSG:
			copy_msg_addr(e, e->args[1]);
			break;
		case SC_GETSOCKOPT:
			if (e->args[4] && !bpf_probe_read_user(&len, sizeof(len), (void *)e->args[4])) {
				e->value = len;
				copy_addr(e, e->args[3], len);
			}
			break;
		case SC_SOCKETPAIR: {
			__s32 sv[2] = {};
			if (!bpf_probe_read_user(sv, sizeof(sv), (void *)e->args[3])) {
				e->value = sv[0];
				e->value2 = sv[1];
				e->has_value = 1;
			}
			break;
		}
		}
		if (lenp && !bpf_probe_read_user(&len, sizeof(len), (void *)lenp)) {
			e->value = len;   /* the address's length the kernel returned */
			copy_addr(e, e->code == SC_RECVFROM ? e->args[4] : e->args[1], len);
		}
	}
	bpf_ringbuf_submit(e, 0);
	return 0;
}
