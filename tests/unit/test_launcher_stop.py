"""The launcher's stop (launcher/local.py::LocalCluster.stop): SIGTERM to every child, then SIGKILL to a child still
running at the grace's end, named on stderr, so that a node slow to stop is seen rather than silently waited for."""
import subprocess
import sys

from expertmesh.config import Config
from expertmesh.launcher import local

DEAF = [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"]
POLITE = [sys.executable, "-c", "import sys, time; print('ready', flush=True); time.sleep(600)"]


def test_a_child_deaf_to_sigterm_is_killed_at_the_grace_and_named(tmp_path, capsys):
    cluster = local.LocalCluster(Config(), tmp_path)
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for command in (POLITE, DEAF)]
    for process in processes:  # each has its SIGTERM handling in place once it says so
        assert process.stdout.readline().strip() == "ready"
    cluster.children = [local.Child("attention node 0", processes[0], POLITE),
                        local.Child("expert node 1", processes[1], DEAF)]
    cluster.stop(grace_s=0.5)
    assert processes[0].returncode == -15 and processes[1].returncode == -9
    err = capsys.readouterr().err
    assert f"expert node 1 (pid {processes[1].pid}) had not stopped 0.5 s after SIGTERM; killing it" in err
    assert "attention node 0" not in err
