"""The glibc mmap-threshold cap that keeps peak RSS from creeping over a long CPU run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)

# After a 4 MiB block is freed, glibc (by default) raises its mmap threshold above 4 MiB, so the next 4 MiB block
# comes from the heap; with the cap it gets its own mmap again. mallinfo2().hblkhd counts the mmapped bytes.
PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from lora_train.allocator import cap_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = cap_mmap_threshold() if sys.argv[1] == "cap" else False
    first = bytearray(4 << 20)
    del first
    before = libc.mallinfo2().hblkhd
    second = bytearray(4 << 20)
    print(applied, libc.mallinfo2().hblkhd - before)
    """
)


def probe(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=environ
    ).stdout.split()
    return out[0], int(out[1])


@glibc
def test_cap_keeps_large_blocks_out_of_the_heap():
    assert probe("default") == ("False", 0)  # glibc's dynamic threshold: the second block came from the heap
    applied, mmapped = probe("cap")
    assert applied == "True" and mmapped >= 4 << 20


@glibc
def test_a_users_own_setting_wins():
    applied, _ = probe("cap", MALLOC_MMAP_THRESHOLD_="65536")
    assert applied == "False"
