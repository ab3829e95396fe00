"""reuse_freed_memory: large tensors come from malloc's heap (reusable pages) instead of fresh kernel mappings."""

import ctypes
import ctypes.util
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
from turbo_i2i.cpu_memory import reuse_freed_memory
took = reuse_freed_memory() if {reuse} else None
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
x = torch.ones(32 * 2**20, dtype=torch.bfloat16)
print(took, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not _glibc_has_mallinfo2(), reason="glibc >= 2.33 only")
@pytest.mark.parametrize("reuse", [False, True])
def test_large_tensors_come_from_the_heap_only_when_asked(reuse):
    probe = [sys.executable, "-c", PROBE.format(reuse=reuse)]
    took, mapped = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
    if reuse:
        assert took == "True" and int(mapped) == 0  # the 64 MB tensor is not a mapping of its own
    else:
        assert int(mapped) >= 64 * 2**20  # glibc's default: a fresh mapping, unmapped again when freed
