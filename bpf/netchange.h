/* An rtnetlink notification (address, link or route change) and who caused
 * it; shared by netchange.bpf.c and pytest_nettrace/probes/netchange.py. */
#ifndef NETTRACE_NETCHANGE_H
#define NETTRACE_NETCHANGE_H
#include "nettrace.h"
#include "sysctl.h"

#define NC_MSG_MAX 1024     /* bytes of the netlink message kept */
#define NC_CMDLINE_MAX 256  /* bytes of the acting process's command line */
/* Bytes of an rtnetlink request kept: a request naming its link by index or
 * name (`ip link del`, `set … down`, `set … netns`) fits; a longer one names
 * no single link for Python. Kept small: two notifications still fit in one
 * page of ring buffer. */
#define NC_REQ_MAX 64

/* A monitor socket the plugin owns in a watched namespace. */
struct nc_sock_key {
	__u32 netns;
	__u32 portid;
};

/* Who queued the kernel work that announces an IPv6 address (the DAD
 * worker): the task, its command line and the stack where it queued it. */
struct nc_origin {
	struct nt_hdr h;    /* h.stack_len: bytes in stack[] */
	__u32 cmdline_len;
	__u32 pad;
	char cmdline[NC_CMDLINE_MAX];
	__u64 stack[NT_MAX_STACK];
	struct sysctl_write sysctl; /* a sysctl write it was making (name[0] == 0: none) */
};

/* The rtnetlink request the acting task is sending, read from the buffer of
 * its system call (write, sendto or sendmsg on a NETLINK_ROUTE socket): the
 * stack says a request is being handled, not which link it names, and the
 * kernel changes other links with it (`ip link del v0` deletes v0's peer). */
struct nc_request {
	__u32 netns;   /* the sending socket's namespace; 0: no request read */
	__u32 len;     /* bytes the call sends (0: unknown); above the first message's length: several */
	__u32 copied;  /* bytes of its start in msg[] */
	__u32 pad;
	__u8 msg[NC_REQ_MAX];
};

/* In an event's header flags: the task fields, command line and stack are
 * those of the task that queued the DAD work which made this change. */
#define NC_F_QUEUED_BY 0x10

struct netchange_event {
	struct nt_hdr h;
	__u64 skb;          /* the queued message's skb: a repeat means one was missed */
	__u32 portid;       /* which monitor socket it was queued on */
	__u32 msg_len;      /* full length of the message */
	__u32 copied;       /* bytes of it in msg[] */
	__u32 cmdline_len;  /* bytes in cmdline[] (NUL-separated argv) */
	char cmdline[NC_CMDLINE_MAX];
	__u8 msg[NC_MSG_MAX];
	struct sysctl_write sysctl; /* the acting thread's last sysctl write (name[0] == 0: none) */
	struct nc_request req;      /* the request it is sending, if any */
	__u64 stack[NT_MAX_STACK];
};

/* nftables (issue 15): a NETLINK_NETFILTER monitor socket in the same map,
 * value NC_SOCK_NFT. The kernel batches a commit's notifications into one
 * message of up to a page (nft_commit_notify), so more of it is kept. */
#define NC_SOCK_RTNL 1
#define NC_SOCK_NFT 2

/* nc_socks' value for a monitor socket. `charged`: the truesize of every
 * message the program saw queued on it, which is what the socket's receive
 * memory grew by (SO_MEMINFO) unless the kernel skipped a call of the
 * program (one already running on that CPU): Python compares the two, so a
 * skipped call for this socket is a loss and one for any other socket is
 * none. */
struct nc_sock {
	__u32 which;      /* NC_SOCK_RTNL or NC_SOCK_NFT */
	__u32 pad;
	__u64 charged;
};
#define NC_NFT_MSG_MAX 4096
#define NC_F_NFT 0x20       /* in the header flags: a struct nftchange_event */

struct nftchange_event {
	struct nt_hdr h;
	__u64 skb;
	__u32 portid;
	__u32 msg_len;
	__u32 copied;
	__u32 cmdline_len;
	char cmdline[NC_CMDLINE_MAX];
	__u8 msg[NC_NFT_MSG_MAX];
	__u64 stack[NT_MAX_STACK];
};
#endif
