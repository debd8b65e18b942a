"""The README's examples are runnable: every ```python block that defines a
test is run as a test file, against the real kernel."""
from __future__ import annotations

import os
import pathlib
import re
import shutil

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_tests() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return {f"test_readme_{i}": b for i, b in enumerate(blocks) if "def test_" in b}


@pytest.mark.parametrize("path", ["plain", "shimmed"])
def test_readme_examples_pass(pytester, monkeypatch, path):
    files = readme_tests()
    assert files, "README has no runnable example"
    pytester.makepyfile(**files)
    if path == "shimmed":
        # as on a machine where python3 is a pyenv shim and NSS asks nscd/userdb:
        # the same pid makes unrelated socket calls before exec'ing python3
        shims = pytester.mkdir("shims")
        shim = shims / "python3"
        shim.write_text(f'#!/bin/bash\n: ~nobody; x=~daemon\nexec {shutil.which("python3")} "$@"\n')
        shim.chmod(0o755)
        monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=sum(b.count("def test_") for b in files.values()))
