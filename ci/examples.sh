#!/usr/bin/env bash
# The main job: set up, then run the example suite (tests a user would write
# for real daemons: dnsmasq, keepalived, a TCP server) with a readable report.
set -uo pipefail
cd "$(dirname "$0")/.."
ci/setup.sh || exit 1
# -v lists each example; timelines are shown for failures only (nothing surprising on success)
.venv/bin/python -m pytest -p no:cacheprovider -v -rs --nettrace-show=failed examples/ "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "examples.sh: no example ran" >&2; rc=1; fi
exit $rc
