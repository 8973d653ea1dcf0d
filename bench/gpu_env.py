"""What a GPU session ran on: the machine, the versions and the caches, printed for its env.log.

    python -m bench.gpu_env

The GPU (name, compute capability, SMs, memory, L2, clocks, driver), python / torch / triton /
peft / transformers / lora_fast versions and where lora_fast was imported from (a stale install
shows there), the git commit and how many files differ from it (a device machine runs the working
tree, committed or not), the date, the lora_fast.dispatch cache file and the Triton cache folder,
then nvidia-smi's own report. Exits 1 if lora_fast cannot be imported (the install failed).
"""
import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "triton", "peft", "transformers", "lora-fast")
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "TRITON_CACHE_DIR", "TRITON_INTERPRET", "LORA_FAST_BACKEND",
            "LORA_FAST_DISPATCH", "LORA_FAST_DISPATCH_CACHE")
SMI_FIELDS = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"


def _run(argv):
    """(a command's stdout, None), or (None, why there is none)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{argv[0]} failed: {e}"
    if done.returncode != 0:
        return None, f"{argv[0]} exited {done.returncode}: {done.stderr.strip()}"
    return done.stdout.strip(), None


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_parser():
    # no lora_fast import here (its failing import is what this reports), so the stdlib's formatter
    return argparse.ArgumentParser(prog="python -m bench.gpu_env", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None):
    build_parser().parse_args(argv)   # no options: --help, or a usage error for anything else
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    commit, why = _run(["git", "rev-parse", "HEAD"])
    changed, _ = _run(["git", "status", "--porcelain"])
    print(f"commit: {commit or why}"
          + (f" ({len(changed.splitlines())} files differ from it)" if changed is not None else ""))
    print(f"host: {platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    for package in PACKAGES:
        print(f"{package}: {_version(package)}")
    for name in ENV_VARS:
        print(f"{name}={os.environ[name]!r}" if name in os.environ else f"{name} unset")

    import torch
    print(f"torch CUDA: {torch.version.cuda}, cuDNN: {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            # clock_rate (kHz) is not in every torch's device properties; nvidia-smi below has the clocks
            clock = getattr(p, "clock_rate", None)
            print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.1f} GiB, L2 {p.L2_cache_size / 2**20:.0f} MiB"
                  + (f", clock {clock / 1e3:.0f} MHz" if clock else ""))
    else:
        print("no CUDA device")

    try:
        import lora_fast
        from lora_fast import dispatch
    except Exception as e:  # noqa: BLE001 - any import failure means the install is broken; say which
        print(f"lora_fast: cannot be imported ({type(e).__name__}: {e})")
        status = 1
    else:
        print(f"lora_fast imported from: {Path(lora_fast.__file__).parent}")
        print(f"dispatch cache: {dispatch.cache_path() or '(in the process only)'}")
        status = 0

    if shutil.which("nvidia-smi"):
        for argv in (["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"], ["nvidia-smi"]):
            text, why = _run(argv)
            print(f"$ {' '.join(argv)}\n{text if text is not None else why}")
    else:
        print("nvidia-smi: not on PATH")
    return status


if __name__ == "__main__":
    sys.exit(main())
