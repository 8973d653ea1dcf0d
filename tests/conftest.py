"""Test set-up: without a CUDA device the Triton kernels run under the interpreter, which must be
switched on before triton is first imported; every test runs with torch's deterministic mode, whose
fill_uninitialized_memory makes torch.empty return NaN-filled tensors, so any output element a
kernel fails to write shows up as NaN. The repository root goes on sys.path so tests can use the
bench package's measurement helpers (bench/ is not installed)."""
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the mode below
# The dispatcher's measured choices stay in the test process (no ~/.cache/lora_fast file).
os.environ.setdefault("LORA_FAST_DISPATCH_CACHE", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous)
