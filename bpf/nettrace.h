/* Shared by every probe and by the Python decoder (pytest_nettrace/kernel/wire.py):
 * the event header, the kinds, and, on the BPF side, the maps every probe
 * shares (watched namespaces, ring buffer) and the helpers that fill a header.
 */
#ifndef NETTRACE_H
#define NETTRACE_H

#define NT_COMM_LEN 16
#define NT_MAX_STACK 48   /* kernel frames kept per event: deep enough for "link down -> addrconf -> notify" */
#define NT_MAX_KINDS 16   /* size of the per-namespace loss table */

/* Event kinds: index into nt_scope.lost; the Python side mirrors these. */
enum nt_kind {
	NT_KIND_RST = 1,
	NT_KIND_NLMSG = 2,   /* a monitor socket notification: addr / link / route / neigh / rule / nft */
	NT_KIND_DROP = 3,
	NT_KIND_CONN = 4,
	NT_KIND_RETRANS = 5,
	NT_KIND_SYSCALL = 6,
	NT_KIND_TRAFFIC = 7,
	NT_KIND_PACKET = 8,   /* AF_PACKET capture (no BPF program): loss counted in Python */
	NT_KIND_SYSCTL = 9,  /* a network sysctl written */
	NT_KIND_NFTRACE = 10, /* nftables verdicts (no BPF program): loss counted in Python */
};

/* Header flags. Softirq context is told from the kernel stack in Python:
 * the preempt counter is a per-cpu variable that BPF can only read as a typed
 * ksym, which needs CONFIG_KALLSYMS_ALL (absent on some kernels). */
#define NT_F_KTHREAD 0x8   /* current task is a kernel thread */

struct nt_hdr {
	__u64 ts;        /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
	__u32 netns;     /* inode of the network namespace the event happened in */
	__u16 kind;      /* enum nt_kind */
	__u16 flags;     /* NT_F_* */
	__u32 pid;       /* tgid of current */
	__u32 tid;
	__u32 uid;
	__u32 ppid;      /* tgid of current's real parent */
	char comm[NT_COMM_LEN];
	char pcomm[NT_COMM_LEN];
	__s32 stack_len; /* bytes of kernel stack in the event's trailer, or -errno */
	__u32 pad;
};

/* nt_pidns value: the observer's pid namespace (see nt_ns_pid). */
struct nt_pidns {
	__u32 inum;      /* its inode (/proc/self/ns/pid); 0: the initial namespace */
	__u32 pad;
};
#define NT_MAX_PIDNS_LEVEL 8   /* nesting searched for it (containers nest 1 or 2 deep) */

/* Per watched namespace: events lost because the ring buffer was full, and
 * when the watch began (bpf_ktime_get_ns; CLOCK_MONOTONIC), for what a
 * program kept from before it. */
struct nt_scope {
	__u64 lost[NT_MAX_KINDS];
	__u64 since;
};

#ifdef __BPF_PROGRAM__
/* ---- BPF side ----
 * Every probe is compiled alone, then all are linked into one object
 * (bpftool gen object) so the kernel BTF is parsed once per load; the shared
 * maps are __weak so the linker keeps one copy of each. */

/* The larger hash maps are not preallocated (BPF_F_NO_PREALLOC): making
 * thousands of entries up front cost ~2 ms of every engine's start-up, for
 * entries a session mostly never uses; one is allocated at its insert. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);             /* netns inode */
	__type(value, struct nt_scope);
} nt_scopes SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);   /* the engine sets the real size */
} nt_events SEC(".maps") __weak;

char LICENSE[] SEC("license") __weak = "GPL";

/* Keeps a record's struct in the object's BTF (BTF has no local variables,
 * and a ring record is only ever a pointer into the ring): the root-free
 * tests compare it with its Python layout in pytest_nettrace/kernel/wire.py. */
#define NT_WIRE(tag) const struct tag *const nt_wire_##tag __attribute__((unused)) = 0

#define PF_KTHREAD 0x00200000

static __always_inline struct nt_scope *nt_watched(__u32 netns)
{
	return bpf_map_lookup_elem(&nt_scopes, &netns);
}

static __always_inline __u32 nt_netns_of_sk(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

static __always_inline __u32 nt_netns_of_dev(const struct net_device *dev)
{
	return BPF_CORE_READ(dev, nd_net.net, ns.inum);
}

/* Reserve room for an event; count the loss against the namespace if full. */
#define nt_reserve(scope, kind, type)                                          \
	({                                                                     \
		type *__e = bpf_ringbuf_reserve(&nt_events, sizeof(type), 0);  \
		if (!__e)                                                      \
			__sync_fetch_and_add(&(scope)->lost[(kind)], 1);       \
		__e;                                                           \
	})

/* How many namespaces the engine watches (written by it). Programs that run
 * for the whole host (every syscall, packet, drop, socket wakeup) return
 * first thing when it is 0: an array lookup the verifier inlines, no helper. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nt_watching SEC(".maps") __weak;

static __always_inline bool nt_idle(void)
{
	__u32 zero = 0;
	__u32 *n = bpf_map_lookup_elem(&nt_watching, &zero);
	return !n || !*n;
}

/* Process ids are reported as the observer (the pytest process) sees them:
 * inside a container, in the container's pid namespace. The engine writes
 * that namespace's inode here (its level cannot be learnt from inside it);
 * 0, the initial namespace, uses the kernel's own numbers at no cost. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nt_pidns);
} nt_pidns SEC(".maps") __weak;

/* The number of `pid` (a struct pid) in the pid namespace `inum`; 0 when it
 * has none there. A global function: the verifier checks its loop once per
 * program, not once for every call (~0.5k instructions each). */
__noinline __weak __u32 nt_pid_nr_in(__u64 pid, __u32 inum)
{
	struct pid *p = (struct pid *)pid;
	if (!p)
		return 0;
	unsigned int level = BPF_CORE_READ(p, level);
	__u64 base = bpf_core_field_offset(struct pid, numbers), size = bpf_core_type_size(struct upid);
	for (unsigned int i = 1; i <= NT_MAX_PIDNS_LEVEL && i <= level; i++) {
		struct upid up = {};
		if (bpf_probe_read_kernel(&up, sizeof(up), (void *)p + base + i * size))
			return 0;
		if (BPF_CORE_READ(up.ns, ns.inum) == inum)
			return up.nr;
	}
	return 0;
}

/* `global` (task's tgid or pid in the initial namespace) as numbered in the
 * observer's pid namespace; 0 when the task is not visible there. */
static __always_inline __u32 nt_ns_pid(struct task_struct *task, __u32 global, bool group)
{
	__u32 zero = 0;
	struct nt_pidns *ns = bpf_map_lookup_elem(&nt_pidns, &zero);
	if (!ns || !ns->inum || !global || !task)
		return global;
	struct pid *p = group ? BPF_CORE_READ(task, group_leader, thread_pid) : BPF_CORE_READ(task, thread_pid);
	return nt_pid_nr_in((__u64)p, ns->inum);
}

static __always_inline __u32 nt_current_ns_tgid(void)
{
	return nt_ns_pid(bpf_get_current_task_btf(), bpf_get_current_pid_tgid() >> 32, true);
}

/* The file behind `task`'s descriptor `fd`, or NULL. Read, not loaded
 * through a trusted task pointer: each pointer loaded through one costs the
 * verifier four searches of the kernel's whole BTF (~1 ms). */
static __always_inline struct file *nt_task_file(struct task_struct *task, __u64 fd)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *f = NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

/* The header of every event. A global function: the verifier checks it
 * once per program, not at every place a program makes an event (inlined,
 * it was a third of the instructions the verifier went through). */
__noinline __weak int nt_fill_hdr(struct nt_hdr *h, __u16 kind, __u32 netns)
{
	if (!h)
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 id = bpf_get_current_pid_tgid();

	h->ts = bpf_ktime_get_ns();
	h->netns = netns;
	h->kind = kind;
	h->flags = (BPF_CORE_READ(task, flags) & PF_KTHREAD) ? NT_F_KTHREAD : 0;
	h->pid = nt_ns_pid(task, id >> 32, true);
	h->tid = nt_ns_pid(task, (__u32)id, false);
	h->uid = (__u32)bpf_get_current_uid_gid();
	struct task_struct *parent = BPF_CORE_READ(task, real_parent);
	h->ppid = nt_ns_pid(parent, BPF_CORE_READ(parent, tgid), true);
	bpf_get_current_comm(h->comm, sizeof(h->comm));
	bpf_probe_read_kernel_str(h->pcomm, sizeof(h->pcomm), &parent->comm);
	h->pad = 0;
	return 0;
}

/* Kernel stack into the event's trailer. ctx is the program's context. */
#define nt_fill_stack(ctx, h, stack)                                           \
	do {                                                                   \
		(h)->stack_len = bpf_get_stack((ctx), (stack),                 \
					       sizeof(__u64) * NT_MAX_STACK, 0); \
	} while (0)

/* The syscall number in tp_btf/sys_enter and sys_exit (a BTF-typed pt_regs,
 * so a direct load): lets a program on every syscall of the machine return
 * at once for the calls it does not want. */
#if defined(__TARGET_ARCH_x86)
#define NT_SYSCALL_NR(regs) ((long)(regs)->orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define NT_SYSCALL_NR(regs) ((long)(regs)->syscallno)
#else
#define NT_SYSCALL_NR(regs) -1
#endif

#endif /* __BPF_PROGRAM__ */
#endif /* NETTRACE_H */
