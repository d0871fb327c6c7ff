# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# shell: interactive busybox shell on the console (use run-guest.sh --interactive).
# Exit the shell to power off.
. /tests/lib.sh
echo "harness shell: exit (or Ctrl-D) powers the guest off"
setsid cttyhack sh
result shell 1 exited
