"""The sysctl probe's decoder, root-free on synthetic records: a write the
kernel restarts is one event whatever stale bytes its records carry past the
strings; two writes are two events, even of the same value by one thread."""
from __future__ import annotations

from pytest_nettrace.kernel import wire
from pytest_nettrace.probes.sysctl import SysctlProbe

from records import decode, record

NAME = b"net/ipv4/ip_forward"


def write(tid: int, old: bytes, new: bytes, syscw: int = 0, wchar: int = 0, io_known: int = 1,
          tail: bytes = b"") -> bytes:
    """A record as the program writes it: the name comes from a per-CPU
    scratch buffer that bpf_sysctl_get_name's strscpy leaves dirty past the
    NUL (`tail`: what a longer name written on that CPU before left there)."""
    return record(wire.SYSCTL_EVENT, wire.Kind.SYSCTL, pid=tid, name_len=len(NAME), old_len=len(old),
                  new_len=len(new), name=NAME + b"\0" + tail, old=old, new=new, io_known=io_known,
                  syscw=syscw, wchar=wchar)


def test_a_restart_on_another_cpu_is_one_event():
    # seen on Debian 6.1: the restarted attempt ran on a CPU whose scratch
    # buffer held "...ept_source_route" past the name
    [ev] = decode(SysctlProbe(), write(7, b"1\n", b"0\n", syscw=5, wchar=100),
                  write(7, b"1\n", b"0\n", syscw=6, wchar=100, tail=b"\0" * 5 + b"ept_source_route"))
    assert (ev.name, ev.old, ev.new) == ("net.ipv4.ip_forward", "1", "0")


def test_every_restart_of_one_write_is_the_same_event():
    got = decode(SysctlProbe(), *[write(7, b"0\n", b"1\n", syscw=5 + i, wchar=100) for i in range(4)])
    assert len(got) == 1


def test_two_writes_of_the_same_value_by_one_thread_are_two_events():
    # the first wrote its 2 bytes: the second is not a restart of it
    got = decode(SysctlProbe(), write(7, b"1\n", b"1\n", syscw=5, wchar=100),
                 write(7, b"1\n", b"1\n", syscw=6, wchar=102))
    assert len(got) == 2


def test_a_write_after_other_writes_of_the_thread_is_another_event():
    got = decode(SysctlProbe(), write(7, b"1\n", b"1\n", syscw=5, wchar=100),
                 write(7, b"1\n", b"1\n", syscw=8, wchar=100))   # failed, then two more write calls
    assert len(got) == 2


def test_threads_are_told_apart():
    got = decode(SysctlProbe(), write(7, b"0\n", b"1\n", syscw=5, wchar=100),
                 write(8, b"0\n", b"1\n", syscw=5, wchar=100),
                 write(7, b"0\n", b"1\n", syscw=6, wchar=100))   # 7's restart after 8's write
    assert [ev.tid for ev in got] == [7, 8]


def test_without_the_kernel_counters_the_same_values_again_are_the_restart():
    got = decode(SysctlProbe(), write(7, b"0\n", b"1\n", io_known=0),
                 write(7, b"0\n", b"1\n", io_known=0, tail=b"junk"))
    assert len(got) == 1


def result(tid: int, ret: int) -> bytes:
    return record(wire.SYSCTL_RESULT, wire.Kind.SYSCTL, flags=wire.SY_F_RESULT, pid=tid, ret=ret)


def events(*recs: bytes) -> list:
    """The events as a trace keeps them: a result's correction in its write's place."""
    out: list = []
    for ev in decode(SysctlProbe(), *recs):
        if ev.supersedes is not None:
            out[out.index(ev.supersedes)] = ev
        else:
            out.append(ev)
    return out


def test_a_restart_the_result_reports_is_one_event_whatever_the_syscall():
    # splice() into net.ipv4.ip_forward while another task held the RTNL:
    # restarted 755 times in a CI run, and splice counts as no write syscall
    # (syscw stays), so each attempt read as a new write with no result
    recs = []
    for _ in range(5):
        recs += [write(7, b"0\n", b"1\n", syscw=5, wchar=100), result(7, -513)]   # ERESTARTNOINTR
    recs += [write(7, b"0\n", b"1\n", syscw=5, wchar=100), result(7, 2)]
    [ev] = events(*recs)
    assert (ev.new, ev.ret, ev.error) == ("1", 2, None)


def test_after_a_restart_another_value_is_another_write():
    got = events(write(7, b"0\n", b"1\n", syscw=5), result(7, -513),
                 write(7, b"0\n", b"2\n", syscw=5), result(7, 2))
    assert [(ev.new, ev.ret) for ev in got] == [("1", None), ("2", 2)]
