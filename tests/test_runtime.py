"""The process settings of vitkit.runtime: glibc keeps and reuses freed memory, on request."""

import subprocess
import sys
import textwrap

import pytest

from vitkit import cli, runtime

# Allocates and frees a 40 MB tensor twelve times; prints the page faults of the last four rounds
# (glibc settles after about six).
FAULTS = textwrap.dedent(
    """
    import resource, torch
    from vitkit.runtime import keep_freed_memory
    print(keep_freed_memory())
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(10_000_000).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[-4:]))
    """
)


def _faults(monkeypatch, malloc: str) -> tuple[str, int]:
    monkeypatch.setenv("VITKIT_MALLOC", malloc)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults(monkeypatch):
    applied, kept = _faults(monkeypatch, "keep")
    _, system = _faults(monkeypatch, "system")
    assert applied == "True"
    # 40 MB is 9766 pages of 4 KiB: glibc maps them afresh per tensor; kept, the steady loop reuses them.
    assert system >= 4 * 9000, system
    assert kept < system / 10, (kept, system)


def test_bad_malloc_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("VITKIT_MALLOC", "jemalloc")
    runtime.keep_freed_memory.cache_clear()
    try:
        with pytest.raises(ValueError, match="VITKIT_MALLOC='jemalloc'"):
            runtime.keep_freed_memory()
        assert cli.main(["info", "Ti/16"]) == 2  # the CLI reports it as a usage error
    finally:
        runtime.keep_freed_memory.cache_clear()
