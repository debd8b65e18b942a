/* An rtnetlink notification (address, link or route change) and who caused
 * it; shared by netchange.bpf.c and pytest_nettrace/probes/netchange.py. */
#ifndef NETTRACE_NETCHANGE_H
#define NETTRACE_NETCHANGE_H
#include "nettrace.h"

#define NC_MSG_MAX 1024     /* bytes of the netlink message kept */
#define NC_CMDLINE_MAX 256  /* bytes of the acting process's command line */

/* A monitor socket the plugin owns in a watched namespace. */
struct nc_sock_key {
	__u32 netns;
	__u32 portid;
};

struct netchange_event {
	struct nt_hdr h;
	__u64 skb;          /* the queued message's skb: a repeat means one was missed */
	__u32 portid;       /* which monitor socket it was queued on */
	__u32 msg_len;      /* full length of the message */
	__u32 copied;       /* bytes of it in msg[] */
	__u32 cmdline_len;  /* bytes in cmdline[] (NUL-separated argv) */
	char cmdline[NC_CMDLINE_MAX];
	__u8 msg[NC_MSG_MAX];
	__u64 stack[NT_MAX_STACK];
};
#endif
