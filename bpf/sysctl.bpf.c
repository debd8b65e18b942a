// SPDX-License-Identifier: GPL-2.0
/* Who wrote a network sysctl (`sysctl -w net.ipv6.conf.eth0.disable_ipv6=1`,
 * `echo 1 > /proc/sys/net/...`): a BPF_PROG_TYPE_CGROUP_SYSCTL program on the
 * cgroup v2 root runs for every sysctl read and write of every process below
 * it, before the write, in the writer's context, and sees the name, the
 * current value and the new one. Only writes under net/ by a task in a
 * watched namespace are recorded. It always allows the write. */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "nettrace.h"
#include "sysctl.h"

NT_WIRE(sysctl_event);
NT_WIRE(sysctl_result);

/* Set by Python when the plan sees the writes' results at sys_exit (the
 * syscall probe's program, which calls sysctl_on_sys_exit). */
const volatile struct {
	__u32 on;
} sy_cfg = {};

/* thread id -> the namespace of its sysctl write still in its syscall */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} sy_pending SEC(".maps");

/* entries in sy_pending: while none, sys_exit looks no write up */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} sy_pending_count SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sysctl_write);
} sy_scratch SEC(".maps");

SEC("cgroup/sysctl")
int sysctl_write(struct bpf_sysctl *ctx)
{
	if (!ctx->write)
		return 1;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u32 netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 1;
	__u32 zero = 0;
	struct sysctl_write *w = bpf_map_lookup_elem(&sy_scratch, &zero);
	if (!w)
		return 1;
	long n = bpf_sysctl_get_name(ctx, w->name, sizeof(w->name), 0);
	if (n < 4 || w->name[0] != 'n' || w->name[1] != 'e' || w->name[2] != 't' || w->name[3] != '/')
		return 1;
	long v = bpf_sysctl_get_new_value(ctx, w->value, sizeof(w->value));
	if (v < 0 && v != -7)  /* -E2BIG: truncated, still worth naming */
		w->value[0] = 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	bpf_map_update_elem(&nt_sysctl_writing, &tid, w, BPF_ANY);

	struct sysctl_event *e = nt_reserve(scope, NT_KIND_SYSCTL, struct sysctl_event);
	if (!e)
		return 1;
	nt_fill_hdr(&e->h, NT_KIND_SYSCTL, netns);
	e->h.stack_len = 0;
	e->name_len = n;
	bpf_probe_read_kernel(e->name, sizeof(e->name), w->name);
	e->old_len = bpf_sysctl_get_current_value(ctx, e->old, sizeof(e->old));
	e->new_len = bpf_sysctl_get_new_value(ctx, e->new, sizeof(e->new));
	e->file_pos = ctx->file_pos;
	e->io_known = 0;
	e->syscw = e->wchar = 0;
	if (bpf_core_field_exists(task->ioac.syscw)) {
		e->io_known = 1;
		e->syscw = BPF_CORE_READ(task, ioac.syscw);
		e->wchar = BPF_CORE_READ(task, ioac.wchar);
	}
	e->cmdline_len = 0;
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	if (mm) {
		unsigned long start = BPF_CORE_READ(mm, arg_start);
		unsigned long end = BPF_CORE_READ(mm, arg_end);
		__u64 len = end > start ? end - start : 0;
		if (len > SY_CMDLINE_MAX - 1)
			len = SY_CMDLINE_MAX - 1;
		len &= SY_CMDLINE_MAX - 1;
		if (len && bpf_probe_read_user(e->cmdline, len, (void *)start) == 0)
			e->cmdline_len = len;
	}
	bpf_ringbuf_submit(e, 0);
	if (sy_cfg.on) {
		/* an entry left by a write whose sys_exit found nothing watched is
		 * this write's now */
		__u32 *stale = bpf_map_lookup_elem(&sy_pending, &tid);
		if (stale) {
			*stale = netns;
		} else if (!bpf_map_update_elem(&sy_pending, &tid, &netns, BPF_NOEXIST)) {
			__s64 *count = bpf_map_lookup_elem(&sy_pending_count, &zero);
			if (count)
				__sync_fetch_and_add(count, 1);
		}
	}
	return 1;
}

/* Called by the syscall probe's tp_btf/sys_exit program (syscall.bpf.c) on
 * every syscall while something is watched: the syscall of a thread whose
 * sysctl write was recorded says how it returned. Whichever syscall it is:
 * the write happened inside it (write, pwritev2, but also sendfile or
 * splice, whose results were taken from the thread's next write(2) when
 * only the write calls were looked at). Only while a recorded write waits
 * for its result (the count) does an exit look its thread up. */
__noinline int sysctl_on_sys_exit(long nr, long ret)
{
	if (!sy_cfg.on)
		return 0;
	__u32 zero = 0;
	__s64 *count = bpf_map_lookup_elem(&sy_pending_count, &zero);
	if (!count || *count <= 0)
		return 0;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 *pending = bpf_map_lookup_elem(&sy_pending, &tid);
	if (!pending)
		return 0;
	__u32 netns = *pending;
	if (!bpf_map_delete_elem(&sy_pending, &tid))
		__sync_fetch_and_add(count, -1);
	struct nt_scope *scope = nt_watched(netns);
	if (!scope)
		return 0;
	struct sysctl_result *e = nt_reserve(scope, NT_KIND_SYSCTL, struct sysctl_result);
	if (!e)
		return 0;
	nt_fill_hdr(&e->h, NT_KIND_SYSCTL, netns);
	e->h.flags |= SY_F_RESULT;
	e->h.stack_len = 0;
	e->ret = ret;
	bpf_ringbuf_submit(e, 0);
	return 0;
}
