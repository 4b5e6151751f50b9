"""Running Triton kernel tests under the interpreter on CPU, shared by the kernel test files.

triton.jit picks compiled vs interpreted when a function is decorated, including triton's own library functions
decorated when triton is first imported. So a file's interpreter cases (`test_interp_*`) run in-process only when
triton was imported in interpreter mode; otherwise `run_interpreter_child` re-runs them in a child pytest with
TRITON_INTERPRET=1 and COMPACTOR_TRITON=1 set before anything imports triton.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_active(child_env: str) -> bool:
    """True when triton in this process was imported with the interpreter switched on. In the child run
    (`child_env` set to 1) the interpreter must be on: its cases must run, never skip."""
    active = False
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "off", "no"):
        import triton.language as tl

        active = type(tl.zeros).__name__ == "InterpretedFunction"
    if os.environ.get(child_env) == "1" and not active:
        raise RuntimeError("child run: TRITON_INTERPRET=1 was set but triton is not in interpreter mode")
    return active


def run_interpreter_child(test_file: str, child_env: str, n_cases: int) -> None:
    """Run `test_file`'s test_interp_* cases in a child pytest with the interpreter on; assert that exactly
    `n_cases` passed and none was skipped."""
    env = dict(os.environ)
    env.update({"TRITON_INTERPRET": "1", "COMPACTOR_TRITON": "1", child_env: "1"})
    # -P as in this process: on a machine without the installed package, the repo root's compactor/ (no kernels/)
    # must not shadow the package layout on PYTHONPATH
    cmd = [sys.executable, *(["-P"] if sys.flags.safe_path else []), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           test_file, "-k", "test_interp_"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed (rc={proc.returncode}):\n{tail}"
    assert f"{n_cases} passed" in proc.stdout, f"expected {n_cases} interpreter cases to pass:\n{tail}"
    assert "skipped" not in proc.stdout.splitlines()[-1], tail
