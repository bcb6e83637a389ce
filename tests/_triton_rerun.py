"""Triton kernel tests without a GPU: the interpreter is chosen when a kernel is decorated (at import),
so a test that must run the kernel re-runs itself in a fresh process with TRITON_INTERPRET=1."""
import os
import subprocess
import sys

import pytest
import torch


def in_interpreter_or_rerun(request, test_file: str) -> bool:
    """True when the test was re-run (and passed) in an interpreter process: the caller returns.
    False when this process runs it (a GPU, or already under the interpreter)."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", f"{test_file}::{request.node.name}"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return True
