#!/bin/sh
# udhcpc hook (busybox udhcpc -s): applies the lease with ip(8), the way
# ifupdown or a small embedded system would. udhcpc exports $interface, $ip,
# $mask (prefix length) and $lease (seconds); $1 says what happened.
case "$1" in
    deconfig)            # at start, and when the lease is released or lost
        ip -4 addr flush dev "$interface" ;;
    bound|renew)         # the kernel's address lifetime follows the lease
        ip addr replace "$ip/$mask" dev "$interface" valid_lft "$lease" preferred_lft "$lease" ;;
esac
