"""The C heap keeps what a forward frees (app/heap.py): a later forward's tensors take no fresh pages."""
import subprocess
import sys

import pytest

from app.heap import _libc_function

# In a process of its own (the setting is the whole process's): minor page faults of a forward-like step
# (two 36 MiB tensors, over glibc's largest mmap threshold, made and freed), once the heap has settled
# (torch's 64-byte aligned blocks leave small pieces between large ones for the first few steps); the
# fewest of four steps, as the kernel now and then faults a kept page again (one step in a few runs
# took 2,304 faults).
FAULTS_PER_STEP = """
import resource, sys, torch
from app.heap import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def step(x):
    y = x * 2
    z = y + 1
    del y
    return z.sum()
x = torch.ones(9 * 2 ** 20)
for _ in range(8):
    step(x)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(4):
    before = faults()
    step(x)
    counts.append(faults() - before)
print(min(counts))
"""
PAGES_PER_STEP = 2 * 36 * 2 ** 20 // 4096


def faults_per_step(heap: str) -> float:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, heap], capture_output=True, text=True,
                            check=True, timeout=120)
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc_function("mallopt") is None, reason="not glibc")
def test_a_forwards_freed_pages_are_reused_only_when_kept() -> None:
    assert faults_per_step("default") > PAGES_PER_STEP / 2  # glibc maps blocks this large afresh each time
    assert faults_per_step("kept") < PAGES_PER_STEP / 100


@pytest.mark.parametrize("setting, model_bound, kept", [
    ("on", False, True), ("off", True, False), ("auto", False, False), ("auto", True, True)])
def test_the_engine_keeps_freed_memory_where_the_model_dominates(monkeypatch, setting: str, model_bound: bool,
                                                                 kept: bool) -> None:
    import app.engine
    from app.config import Settings

    calls = []
    monkeypatch.setattr(app.engine, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(app.engine, "MODEL_BOUND_FORWARD_S", 0.0 if model_bound else 60.0)
    engine = app.engine.Engine(Settings(keep_freed_memory=setting, compile="off", device="cpu"))
    assert calls == ([True] if kept else []) and engine.keeps_freed_memory is kept
