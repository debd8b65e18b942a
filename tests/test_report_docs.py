"""The report examples of README.md run: every ```python block
that defines a test passes, and the one that only defines a helper works on
a real --nettrace-report file."""
from __future__ import annotations

import os
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list:
    text = DOC.read_text()
    section = text[text.index("## Reports"):text.index("## Kernels")]  # reports, gates, the command
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_doc_examples_pass_and_write_readable_files(pytester):
    blocks = python_blocks()
    tests = {f"test_doc_{i}": b for i, b in enumerate(blocks) if "def test_" in b}
    helper = next(b for b in blocks if "def deleted_addresses" in b)
    assert tests, "the doc has no runnable example"
    pytester.makepyfile(**tests)
    pytester.makepyfile(test_deletes="""
        def test_deletes(netns, nettrace):
            netns.add_dummy("eth0", "192.0.2.10/24")
            netns.run(["ip", "addr", "del", "192.0.2.10/24", "dev", "eth0"], check=True)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--nettrace-report=nettrace-out")
    result.assert_outcomes(passed=sum(b.count("def test_") for b in tests.values()) + 1)
    namespace: dict = {}
    exec(helper, namespace)
    out = pytester.path / "nettrace-out"
    path = next(out / f for f in os.listdir(out)
                if f.startswith("test_deletes.py__test_deletes") and f.endswith(".jsonl"))
    assert namespace["deleted_addresses"](path) == [
        ("192.0.2.10/24", "ip", "ip addr del 192.0.2.10/24 dev eth0")]
