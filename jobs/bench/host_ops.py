"""What the host launches in a decode step, as jobs/bench/overhead.py and jobs/bench/time_step.py count it: the
aten ops called from Python or from inductor's wrapper (torch.profiler), the kernels inductor generated (read
from its code), and the host reads among the aten calls. Imports torch only, so that time_step.py can run it
beside an older revision's ``decoding``."""

from __future__ import annotations

import re

from torch.profiler import ProfilerActivity, profile

HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}


def top_level_aten_calls(step) -> list[str]:
    """The names of the aten ops ``step()`` calls from Python or from compiled code, not counting the aten
    calls those ops make inside."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = []
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(event.name)
    return names


def kernel_launches(source: str) -> int:
    """Calls of inductor's generated kernels in its wrappers' ``call`` functions (C++ on a CPU, Triton on CUDA)."""
    return len(re.findall(r"^\s+(cpp_fused_\w+\(|triton_\w+\.run\()", source, flags=re.M))
