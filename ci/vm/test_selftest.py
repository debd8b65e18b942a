"""Self-check of the VM harness: run by `ci/vm-test --selftest` in the guest.

It proves the guest offers what the plugin's stock_kernel tests need, using
only system tools (ip, bpftrace), so it works before the plugin does.
"""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

NETNS = f"nt-selftest-{uuid.uuid4().hex[:8]}"
# Makes the kernel run tcp_v4_connect: a connection to a closed port on the
# guest's own loopback (refused at once, nothing leaves the VM).
CONNECT = ("import socket; s = socket.socket(); s.settimeout(5); "
           "s.connect_ex(('127.0.0.1', 9))")


def sh(*cmd, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_root():
    assert os.geteuid() == 0


def test_kprobe_pmu():
    assert os.path.isdir("/sys/bus/event_source/devices/kprobe")


def test_btf_and_fs():
    assert os.path.exists("/sys/kernel/btf/vmlinux")
    assert os.path.isdir("/sys/kernel/tracing/events/tcp")
    assert os.path.ismount("/sys/fs/bpf")


@pytest.fixture
def netns():
    assert sh("ip", "netns", "add", NETNS).returncode == 0
    yield NETNS
    sh("ip", "netns", "del", NETNS)


def test_dummy_in_netns(netns):
    # 192.0.2.0/24 is TEST-NET-1, inside a netns inside the VM: no traffic.
    for cmd in (["link", "add", "nt0", "type", "dummy"],
                ["addr", "add", "192.0.2.1/24", "dev", "nt0"],
                ["link", "set", "nt0", "up"]):
        r = sh("ip", "-n", netns, *cmd)
        assert r.returncode == 0, r.stderr
    out = sh("ip", "-n", netns, "-br", "addr", "show", "nt0").stdout
    assert "192.0.2.1/24" in out


def bpftrace(probe, tmp_path):
    if not shutil.which("bpftrace"):
        pytest.skip("bpftrace not installed")
    # bpftrace -c splits its command on spaces, without a shell: use a file.
    script = tmp_path / "connect.py"
    script.write_text(CONNECT)
    prog = f'{probe}:tcp_v4_connect {{ printf("hit\\n"); exit(); }}'
    r = sh("bpftrace", "-e", prog, "-c", f"{sys.executable} {script}")
    assert r.returncode == 0, r.stderr
    assert "hit" in r.stdout, r.stdout + r.stderr


def test_bpftrace_kprobe(tmp_path):
    bpftrace("kprobe", tmp_path)


def test_bpftrace_fentry(tmp_path):
    bpftrace("kfunc", tmp_path)  # bpftrace's name for fentry
