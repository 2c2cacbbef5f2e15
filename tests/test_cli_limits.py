"""Process limits the commands set for themselves."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

PROBE = ("import resource, sys\n"
         "from fleetsync.cli import main\n"
         "main.add_command(__import__('click').command('probe')(lambda: print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])))\n"
         "main(['probe'])\n")


def test_commands_raise_the_open_files_soft_limit_to_the_hard_limit() -> None:
    """A replica keeps a descriptor per old version waiting to be unlinked: a systemd default of 1024
    must not make it fail with EMFILE, so every command starts by raising its soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit of open files here is {hard}: nothing to raise")

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         preexec_fn=low, check=True).stdout
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    assert int(out.strip()) == want
