#!/usr/bin/env bash
# The plugin's own tests on a fresh machine: set up, build the probes from the
# current sources, run the suite on this kernel under pytest-xdist, then the
# stock-kernel VM stage (ci/vm-test) for what this kernel cannot exercise.
#   sudo ci/test.sh               # everything
#   sudo ci/test.sh -k rst        # extra arguments go to pytest (host stage)
#   NETTRACE_VM=0 sudo ci/test.sh # skip the VM stage
set -uo pipefail
cd "$(dirname "$0")/.."
ci/setup.sh || exit 1

# -rs lists every skip with its reason; pytest's exit 5 (no test ran) is a failure too.
.venv/bin/python -m pytest -n 2 -p no:cacheprovider -rs tests/ "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "test.sh: no test ran" >&2; rc=1; fi
[ $rc -eq 0 ] || exit $rc

if [ "${NETTRACE_VM:-1}" != 0 ] && [ -x ci/vm-test ]; then
    echo "=== stock-kernel VM stage (ci/vm-test): paths this kernel lacks ==="
    # the stock_kernel tests (kprobe/fentry fallbacks, real dummy) plus a smoke subset
    timeout 900 ci/vm-test --timeout 840 -- -m "stock_kernel or smoke" -v -rs -p no:cacheprovider tests/
    vrc=$?
    [ $vrc -eq 0 ] || { echo "test.sh: VM stage failed ($vrc)" >&2; exit $vrc; }
fi
