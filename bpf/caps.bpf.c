// SPDX-License-Identifier: GPL-2.0
/* Feature probes: each program is loaded and attached alone to learn whether
 * the kernel allows that mechanism. They do nothing when they fire. */
#define __BPF_PROGRAM__
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") __weak = "GPL";

SEC("tp_btf/sched_process_free")
int BPF_PROG(cap_tp_btf) { return 0; }

SEC("tracepoint/sched/sched_process_free")
int cap_tracepoint(void *ctx) { return 0; }

SEC("fentry/tcp_v4_connect")
int BPF_PROG(cap_fentry) { return 0; }

SEC("kprobe/tcp_v4_connect")
int BPF_KPROBE(cap_kprobe) { return 0; }
