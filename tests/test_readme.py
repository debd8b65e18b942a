"""The README's examples are runnable: every ```python block that defines a
test is run as a test file, against the real kernel."""
from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_tests() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return {f"test_readme_{i}": b for i, b in enumerate(blocks) if "def test_" in b}


def test_readme_examples_pass(pytester):
    files = readme_tests()
    assert files, "README has no runnable example"
    pytester.makepyfile(**files)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=sum(b.count("def test_") for b in files.values()))
