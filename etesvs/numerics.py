"""Which CPU kernels torch runs, so that a table computed on one x86 machine is computed again on another.

torch chooses its CPU kernels by what the processor offers: ATen's vectorised loops (AVX-512 or AVX2), oneDNN's
convolutions (up to AVX-512 and AMX) and MKL's matrix products (a code path per CPU family). Different kernels add
in different orders, and training amplifies those last-bit differences: on the demo, one commit run with AVX-512
kernels and again with AVX2 kernels gave tables up to 14 points apart (F1@50), with every stage's inputs
identical up to the first pretraining step. Fixed seeds and thread counts only make a run repeat on the same kind
of CPU.

``cpu_kernels: avx2`` (conf/config.yaml) pins all three libraries to their AVX2 code: ATen's AVX2 loops
(``ATEN_CPU_CAPABILITY``), oneDNN's AVX2 kernels at most (``DNNL_MAX_CPU_ISA``) and MKL's conditional numerical
reproducibility branch for AVX2 (``MKL_CBWR``, which also fixes its cache-size and scheduling choices). Every x86
CPU since about 2015 has AVX2. It costs speed where AVX-512 was available: on the demo's 2 cores the I3D
pretraining took 321 s instead of 202 s and a fresh `make repro` 15 min 44 s instead of 12 min 27 s (commit
e63052b). ``native``
leaves torch's own choice (the fastest kernels of this CPU). Neither setting applies on a GPU.
"""

from __future__ import annotations

import os
import platform

import torch

from etesvs.errors import EtesvsError

CPU_KERNELS = ("avx2", "native")
PINNED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
_X86 = {"x86_64", "amd64", "x86", "i686"}


def use_cpu_kernels(setting: str) -> str:
    """Make this process run the CPU kernels of ``setting`` (``"avx2"`` or ``"native"``); returns what it runs.

    Call it at the start of a stage, before torch's first CPU operation: the three libraries read their setting
    once, at their first use. Raises :class:`EtesvsError` for an unknown setting, and for ``"avx2"`` when torch
    has already chosen other kernels in this process. A CPU that is not x86 or lacks AVX2 keeps its own kernels
    (said in the returned text): its results are not those of a pinned run.
    """
    if setting not in CPU_KERNELS:
        raise EtesvsError(f"cpu_kernels: {setting!r} is not one of {', '.join(CPU_KERNELS)}")
    if setting == "native":
        return f"native ({torch.backends.cpu.get_cpu_capability()})"
    if platform.machine().lower() not in _X86 or not torch.cpu._is_avx2_supported():
        return f"native ({platform.machine()} without AVX2: cpu_kernels avx2 cannot apply)"
    os.environ.update(PINNED_AVX2)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise EtesvsError(f"cpu_kernels: avx2 was asked after torch had chosen its {capability} kernels in this "
                          "process (call use_cpu_kernels before the first CPU operation)")
    return "avx2 (ATen AVX2, oneDNN at most AVX2, MKL reproducible AVX2 branch)"
