"""reuse_freed_memory: large tensors come from malloc's heap (reusable pages) instead of fresh kernel mappings."""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest


def _glibc_has_mallinfo2():
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


# Run in a fresh interpreter (the setting is process-wide and cannot be undone): report whether it took effect and
# how many bytes of separate kernel mappings (mallinfo2's hblkhd) a 64 MB tensor added.
PROBE = """
import ctypes, ctypes.util, torch
from turbo_i2i.cli import main
from turbo_i2i.cpu_memory import reuse_freed_memory
took = {setup}
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
x = torch.ones(32 * 2**20, dtype=torch.bfloat16)
print(took, libc.mallinfo2().hblkhd - before)
"""


def mapped_bytes_of_a_64_mb_tensor(setup, cwd=None):
    """Run ``setup`` in a fresh interpreter, then allocate 64 MB: (what setup returned, bytes newly mapped)."""
    probe = [sys.executable, "-c", PROBE.format(setup=setup)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(probe, capture_output=True, text=True, check=True, env=env, cwd=cwd)
    took, mapped = run.stdout.split()[-2:]
    return took, int(mapped)


glibc_only = pytest.mark.skipif(not _glibc_has_mallinfo2(), reason="glibc >= 2.33 only")


@glibc_only
def test_large_tensors_come_from_the_heap_only_when_asked():
    took, mapped = mapped_bytes_of_a_64_mb_tensor("reuse_freed_memory()")
    assert took == "True" and mapped == 0  # the 64 MB tensor is not a mapping of its own
    _, mapped = mapped_bytes_of_a_64_mb_tensor("None")
    assert mapped >= 64 * 2**20  # glibc's default: a fresh mapping, unmapped again when freed


@glibc_only
@pytest.mark.parametrize(
    "argv, reused",
    [
        (["translate", "--model", "no-such-model", "--input", "no-such.png", "--output", "out.png"], True),
        (["models"], False),
    ],
)
def test_the_inference_commands_switch_it_on(argv, reused, tmp_path):
    code, mapped = mapped_bytes_of_a_64_mb_tensor(f"main({argv!r})", cwd=tmp_path)
    assert code == ("2" if argv[0] == "translate" else "0")  # the bad input still fails cleanly
    assert (mapped == 0) is reused
