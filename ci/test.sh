#!/usr/bin/env bash
# The plugin's own tests on a fresh machine (see ci/README.md):
#   1. set up (ci/setup.sh)
#   2. offline checks: the shipped objects match the sources and relocate on
#      stock kernels of both architectures (no root, no kernel needed); then
#      the type checker and the linter (mypy, ruff: pyproject.toml), and
#      the root-free unit layer, run without privileges (ci/unit-test)
#   3. the suite on this kernel, under pytest-xdist; then the host-safety
#      stage (kills, signals, bystanders: tests/test_host_safety.py); then the
#      README's "use it in your own project" recipe (ci/recipe-test)
#   4. the suite again inside a container-like sandbox (ci/container-run: no
#      tracefs/debugfs, empty /run, own pid and network namespaces)
#   5. the kernel matrix: the whole suite on Debian's 6.1 and 6.12 kernels in
#      VMs (ci/vm-test), for what this kernel lacks (kprobes, fentry, dummy)
#   sudo ci/test.sh               # everything
#   sudo ci/test.sh -k rst        # extra arguments go to pytest (stages 3 and 4)
#   NETTRACE_VM=0 sudo ci/test.sh # skip stage 5
#   NETTRACE_VM_KERNELS="6.12" sudo ci/test.sh   # the kernels of stage 5
set -uo pipefail
cd "$(dirname "$0")/.."
ci/setup.sh || exit 1

T0=$SECONDS
stage() { echo; echo "=== $* ($((SECONDS - T0)) s into the run) ==="; }
# pytest's exit 5 (no test ran) is a failure too
check() {
    local rc=$1 what=$2
    if [ "$rc" -eq 5 ]; then echo "test.sh: $what: no test ran" >&2; rc=1; fi
    if [ "$rc" -ne 0 ]; then echo "test.sh: $what failed ($rc)" >&2; exit "$rc"; fi
}
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider -rfEs)

stage "offline checks of the shipped probes"
"${PYTEST[@]}" -q tests/test_build.py
check $? "offline checks"

stage "type check and lint (mypy, ruff: pyproject.toml)"
.venv/bin/python -m mypy
check $? "mypy"
.venv/bin/python -m ruff check pytest_nettrace tests bench
check $? "ruff"

stage "the root-free unit layer, without privileges (ci/unit-test)"
ci/unit-test
check $? "unit layer"

stage "the suite on this kernel ($(uname -r))"
"${PYTEST[@]}" -n 2 -m "not host_safety" tests/ "$@"
check $? "host suite"

stage "host safety: kills, signals, bystanders (tests/test_host_safety.py)"
# On its own, after the suite: these sessions signal and sandbox whole pytest runs.
timeout 300 "${PYTEST[@]}" -n 2 -m host_safety tests/test_host_safety.py
check $? "host-safety stage"

stage "the README's recipe: wheel and sdist into a fresh venv with no compiler (ci/recipe-test)"
ci/recipe-test
check $? "recipe"

stage "the suite in a container-like sandbox (ci/container-run)"
ci/container-run "${PYTEST[@]}" -n 2 -m "not host_safety" tests/ "$@"
check $? "container stage"

if [ "${NETTRACE_VM:-1}" != 0 ] && [ -x ci/vm-test ]; then
    for kernel in ${NETTRACE_VM_KERNELS:-6.1 6.12}; do
        stage "the whole suite on Debian's $kernel kernel (ci/vm-test)"
        # the VM's own timeout bounds the boot and the run; timeout(1) is a backstop
        timeout 2700 ci/vm-test --kernel "$kernel" --timeout 2400 -- -n 2 -v -rfEs -p no:cacheprovider -m "not host_safety" tests/
        check $? "VM stage ($kernel)"
    done
fi
echo "test.sh: all stages passed in $((SECONDS - T0)) s"
