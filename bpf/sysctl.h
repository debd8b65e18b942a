/* Writes to network sysctls (/proc/sys/net, `sysctl -w`) and who made them;
 * shared by sysctl.bpf.c, netchange.bpf.c and pytest_nettrace/probes/sysctl.py. */
#ifndef NETTRACE_SYSCTL_H
#define NETTRACE_SYSCTL_H
#include "nettrace.h"

#define SY_NAME_MAX 128     /* "net/ipv6/conf/<dev>/disable_ipv6" */
#define SY_VALUE_MAX 64     /* bytes of the old and of the new value kept */
#define SY_CMDLINE_MAX 256  /* bytes of the writer's command line */

/* What a thread is writing right now: netchange names a change the write
 * made (IPv6 addresses removed by disable_ipv6=1) after it. */
struct sysctl_write {
	char name[SY_NAME_MAX];
	char value[SY_VALUE_MAX];
};

#define SY_F_RESULT 0x100   /* the record is a struct sysctl_result */

struct sysctl_event {
	struct nt_hdr h;        /* no stack: cgroup programs cannot take one */
	__s32 name_len;         /* bytes in name[], or -errno */
	__s32 old_len;          /* bytes in old[], or -errno (-E2BIG: truncated) */
	__s32 new_len;          /* bytes in new[], or -errno */
	__u32 cmdline_len;
	__u32 file_pos;         /* where in the file the write starts */
	__u32 io_known;         /* 1: syscw and wchar below are the thread's */
	/* The thread's write syscalls and bytes written so far (task->ioac,
	 * CONFIG_TASK_XACCT): a write the kernel restarts comes back as the very
	 * next write syscall with nothing written in between, which a second
	 * write of the same value never does once the first one wrote it. */
	__u64 syscw;
	__u64 wchar;
	char name[SY_NAME_MAX];
	char old[SY_VALUE_MAX];
	char new[SY_VALUE_MAX];
	char cmdline[SY_CMDLINE_MAX];
};

/* How the thread's write syscall that carried a sysctl_event returned
 * (the hook runs before the kernel takes the value, which it may refuse):
 * from sys_exit, after its sysctl_event (a restarted write: after each). */
struct sysctl_result {
	struct nt_hdr h;        /* flags: SY_F_RESULT */
	__s64 ret;              /* bytes written, or -errno */
};

#ifdef __BPF_PROGRAM__
/* thread id -> its last sysctl write in a watched namespace (the entry is
 * stale once the write returned: Python uses it only when the stack of a
 * change runs through the sysctl write handler) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct sysctl_write);
} nt_sysctl_writing SEC(".maps") __weak;
#endif
#endif
