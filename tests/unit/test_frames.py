"""Frames of a module's functions carry the module's name (nf_tables is a module
on distribution kernels): every decision made on function names must see
through it. Root-free."""
from pytest_nettrace.events import context_of
from pytest_nettrace.kernel.symbols import frame_function


def test_frame_function_strips_offset_module_and_suffix():
    assert frame_function("nf_tables_newrule [nf_tables]+0x1a2") == "nf_tables_newrule"
    assert frame_function("tcp_v4_rcv.cold+0x2") == "tcp_v4_rcv"
    assert frame_function("__do_softirq+0x10") == "__do_softirq"
    assert frame_function("nft_do_chain [nf_tables]") == "nft_do_chain"


def test_softirq_seen_through_a_module_frame():
    assert context_of(["nft_do_chain [nf_tables]+0x40f", "net_rx_action+0x1"]) == "softirq"
