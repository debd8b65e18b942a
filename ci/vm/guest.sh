#!/bin/bash
# Runs inside the virtme-ng guest, as root, started by ci/vm-test.
#
# The guest's root filesystem is the host's, shared read-only over 9p; the
# repo is shared read-write.  ci/vm-test passes its settings as NT_* variables:
#   NT_REPO     repo to cd into
#   NT_KCONFIG  the kernel's config file  NT_PYIMG   "1" if the Python image is attached
#   NT_STDLIB / NT_PURELIB  where the image's stdlib/ and purelib/ go
#   NT_COMMAND  a file: the command to run (normally python -m pytest ...),
#               its words each ended by a NUL
# Exit status: the command's, or 125 if the guest could not be set up.
set -u

say() { echo "guest [$(cut -d' ' -f1 /proc/uptime)s]: $*"; }   # guest uptime
yesno() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }

say "booted"

# virtme mounts tracefs/debugfs but not bpffs; mount whatever is missing.
mnt() { mountpoint -q "$2" || mount -t "$1" "$1" "$2" || say "cannot mount $1 on $2"; }
mnt tracefs /sys/kernel/tracing
mnt debugfs /sys/kernel/debug
mnt bpf /sys/fs/bpf
ulimit -l unlimited   # kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK

# Python imports over 9p are ~100x slower than from a local disk, so
# ci/vm-test packs the stdlib and site-packages into a read-only ext4 image.
# Bind-mounting it over the original paths keeps every path the same (venv
# symlinks, editable-install .pth files pointing at the repo all still work).
if [ "${NT_PYIMG:-}" = 1 ]; then
    modprobe -q virtio_blk; modprobe -q ext4
    mkdir -p /run/nt/img /run/nt/base-site
    for _ in $(seq 50); do blkid -L ntpy >/dev/null 2>&1 && break; sleep 0.2; done
    if mount -o ro LABEL=ntpy /run/nt/img; then
        # The image leaves out the base interpreter's site-packages (huge, and
        # unused by a venv): keep the 9p one visible underneath.
        [ -d "$NT_STDLIB/site-packages" ] && mount --bind "$NT_STDLIB/site-packages" /run/nt/base-site
        mount --bind /run/nt/img/stdlib "$NT_STDLIB"
        [ -d "$NT_STDLIB/site-packages" ] && mount --bind /run/nt/base-site "$NT_STDLIB/site-packages"
        [ -d /run/nt/img/purelib ] && mount --bind /run/nt/img/purelib "$NT_PURELIB"
        say "python from the ext4 image"
    else
        say "could not mount the Python image; importing over 9p (slow)"
    fi
fi

dummy=$(yesno modprobe dummy numdummies=0)
kprobes=$(yesno test -e /sys/bus/event_source/devices/kprobe)
btf=$(yesno test -e /sys/kernel/btf/vmlinux)
# fentry (BPF trampolines) needs BTF plus direct-call ftrace; the selftest
# attaches one for real, this line only reads the kernel's build config.
fentry=no
if [ "$btf" = yes ] && grep -q '^CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y' "${NT_KCONFIG:-/dev/null}" 2>/dev/null; then
    fentry=yes
fi
tracepoints=$(yesno test -d /sys/kernel/tracing/events/tcp)
netns=$(yesno unshare -n true)
say "kernel $(uname -r), kprobes $kprobes, fentry $fentry, tracepoints $tracepoints, btf $btf, dummy $dummy, netns $netns"

cd "$NT_REPO" || exit 125
# A guest boots for one run: a minimal CO-RE BTF made for later sessions of
# this boot would only cost emulated CPU while the tests run.
export NETTRACE_FULL_BTF=1
mapfile -d '' cmd < "$NT_COMMAND" || exit 125
say "running: ${cmd[*]}"
"${cmd[@]}"
rc=$?
say "exit status $rc"
exit $rc
