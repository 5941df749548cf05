"""A description of the machine a measurement ran on (benchmarks and results logs state it beside their numbers)."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    """host, CPU model, cores, RAM (GB), GPU name (or "none"), torch version and the load average now."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(), ram_gb=round(mem_gb, 1), gpu=gpu,
                torch=torch.__version__, load_avg=" ".join(f"{x:.1f}" for x in os.getloadavg()))
