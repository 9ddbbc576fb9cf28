"""What device a worker runs on: a readable name for output rows, and an identity for profile caches."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field


class DeviceIdentity(BaseModel):
    """Everything a step-latency profile depends on besides the model: two workers with equal identities
    can share a profile."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="'cuda' or 'cpu' (the torch device type).")
    name: str = Field(description="GPU name, or the CPU model.")
    memory_gib: float | None = Field(default=None, description="GPU memory (None for a CPU).")
    compute_capability: str | None = Field(default=None, description="CUDA compute capability, e.g. '9.0'.")
    threads: int | None = Field(default=None, description="torch intra-op threads (CPU only).")
    torch_version: str = Field(description="torch.__version__.")
    dtype: str = Field(description="The model's dtype, e.g. 'float32'.")

    @property
    def readable(self) -> str:
        """For output rows and logs, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC 7B13 (2 threads)'."""
        if self.kind == "cpu":
            return f"cpu: {self.name} ({self.threads} threads)"
        return self.name

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def identify(device: torch.device | str, dtype: torch.dtype) -> DeviceIdentity:
    device = torch.device(device)
    common = {"torch_version": torch.__version__, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceIdentity(kind="cuda", name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                              compute_capability=f"{props.major}.{props.minor}", **common)
    if device.type != "cpu":
        return DeviceIdentity(kind=device.type, name=device.type, **common)
    return DeviceIdentity(kind="cpu", name=cpu_model_name(), threads=torch.get_num_threads(), **common)


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"
