"""CPU kernel pinning (etesvs/numerics.py): the setting reaches torch, ATen, oneDNN and MKL, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from etesvs.errors import EtesvsError
from etesvs.numerics import use_cpu_kernels

PROBE = """
import json, os, sys
import torch
from etesvs.numerics import use_cpu_kernels
said = use_cpu_kernels(sys.argv[1])
torch.manual_seed(0)
x = torch.nn.Conv2d(3, 8, 3)(torch.randn(2, 3, 16, 16)).sum().item()
print(json.dumps({"said": said, "capability": torch.backends.cpu.get_cpu_capability(),
                  "env": {key: os.environ.get(key)
                          for key in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_CBWR")}}))
"""

AVX2 = torch.cpu._is_avx2_supported()


def _probe(setting: str) -> dict:
    env = {key: value for key, value in __import__("os").environ.items()
           if key not in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_CBWR")}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, env=env,
                            check=True)  # fmt: skip
    return json.loads(result.stdout)


@pytest.mark.skipif(not AVX2, reason="needs an x86 CPU with AVX2")
def test_avx2_pins_the_three_libraries_in_a_fresh_process():
    pinned = _probe("avx2")
    assert pinned["capability"] == "AVX2" and pinned["said"].startswith("avx2")
    assert pinned["env"] == {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
    native = _probe("native")
    assert native["said"] == f"native ({native['capability']})"
    assert native["env"] == {"ATEN_CPU_CAPABILITY": None, "DNNL_MAX_CPU_ISA": None, "MKL_CBWR": None}


def test_unknown_setting_and_late_pinning_are_refused(monkeypatch):
    for key in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_CBWR"):
        monkeypatch.setenv(key, "")  # restored after the test: the pinning below must not leak into other tests
    with pytest.raises(EtesvsError, match="cpu_kernels: 'avx512' is not one of avx2, native"):
        use_cpu_kernels("avx512")
    torch.ones(4).sum()  # this test process has long chosen its kernels
    if AVX2 and torch.backends.cpu.get_cpu_capability() != "AVX2":
        with pytest.raises(EtesvsError, match="after torch had chosen its"):
            use_cpu_kernels("avx2")
