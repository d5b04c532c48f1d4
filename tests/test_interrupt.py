"""katactl.interrupt in-process: the flag sleep() waits on belongs to one run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from katactl import interrupt


def test_an_interrupt_does_not_outlive_its_run():
    """After one run got SIGTERM, every later interrupt.sleep in the process (metrics.top_snapshot's
    wait, a library call, the next in-process command) raised KeyboardInterrupt at once."""
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(60)  # the handler raises here
    assert signal.getsignal(signal.SIGTERM) == before
    try:
        interrupt.sleep(0.01)  # no signal since: it sleeps
    except KeyboardInterrupt:  # (uncaught, it would end the whole pytest session)
        pytest.fail("interrupt.sleep raised on the previous run's interrupt")


# -- SIGTERM/SIGHUP from katactl's start to its exit (review 13 mutate, finding 3) -------------------
# The child is `python -m katactl` as runpy runs it, with a test instrument around it: an audit
# hook sends the signal when a chosen module starts importing (a real signal at a real point of
# start-up), or the signal is sent once katactl's main has returned (the result printed, the
# process not yet gone) or from a __del__ run while the interpreter tears its modules down.
# Nothing of katactl is patched.
_CHILD = r"""
import os, runpy, signal, sys
sig, when = int(sys.argv[1]), sys.argv[2]
sent = []
def hook(event, args):
    if event == "import" and args[0] == when and not sent:
        sent.append(1)
        os.kill(os.getpid(), sig)
class AtTeardown:  # its __del__ runs while the interpreter tears __main__ down, after flushing stdout
    def __del__(self):
        os.kill(os.getpid(), sig)
        os.write(2, b"signalled at teardown\n")  # only if the signal did not end the process
if when == "teardown":
    keep = AtTeardown()
elif when != "exit":
    sys.addaudithook(hook)
sys.argv = ["katactl", "version", "-o", "json"]
try:
    runpy.run_module("katactl", run_name="__main__", alter_sys=True)
except SystemExit:
    if when == "exit":
        os.kill(os.getpid(), sig)
    raise
"""


def _child(sig: int, when: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, str(int(sig)), when], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("when", ["typer", "katactl.commands._common"])
def test_a_signal_during_start_up_is_an_interrupt_with_the_json_error(sig, when):
    """While Python imports the CLI (typer) or main resolves the command (its module's import),
    before the command's own handler: the default action ended katactl (rc -15, shell 143) with
    no JSON error object, although -o json promises one for every failure."""
    p = _child(sig, when)
    assert p.returncode == 130, (p.returncode, p.stdout, p.stderr)
    j = json.loads(p.stdout)
    assert j["kind"] == "Error" and j["code"] == "Interrupted" and j["exitCode"] == 130, j
    assert p.stderr == "katactl: error: interrupted\n", p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("when", ["exit", "teardown"])
def test_a_signal_after_the_command_completed_keeps_its_exit_code(sig, when):
    """Once the command has completed (its result printed, its audit record written), a SIGTERM
    before the process is gone killed it (rc -15: Ansible saw a failure for a change that was
    made and reported): when main had returned, and in the interpreter's teardown, where Python
    has put its handlers back to the default action. The command is not interrupted any more:
    its own code, one result."""
    p = _child(sig, when)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert json.loads(p.stdout)["kind"] == "Version"
    assert p.stderr == ("signalled at teardown\n" if when == "teardown" else ""), p.stderr
