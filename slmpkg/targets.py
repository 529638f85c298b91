"""Hardware targets: the catalog, host detection, and which published artifact a host should pull.

A *target* names the hardware an artifact was made for (``cpu-x86_64-avx2``, ``cuda-sm80``,
``jetson-orin``...). The registry keeps one artifact per target; ``slmpkg pull NAME:TAG --target auto``
calls :func:`detect_host`, ranks the targets the host can run with :func:`compatible_targets` and
picks the best published artifact that fits the memory budget with :func:`choose_artifact`.

OCI platforms (os/arch/variant) cannot express accelerators, so the catalog and the rules live here.

Example:
    >>> host = Host(arch="x86_64", cpu_features={"avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe",
    ...             "avx", "xsave", "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"},
    ...             gpus=[Gpu(compute_capability=(7, 5), memory=15 * GiB)], memory_available=60 * GiB)
    >>> [t.name for t in compatible_targets(host)]
    ['cuda-sm75', 'cuda-sm70', 'cpu-x86_64-avx2', 'cpu-x86_64']
    >>> choose_artifact(host, {"cuda-sm80": 16 * GiB, "cuda-sm75": 20 * GiB, "cpu-x86_64-avx2": 4 * GiB})
    'cpu-x86_64-avx2'

Ranking rules (see :func:`compatible_targets`):

* GPU targets come first, CPU targets always follow as the fallback.
* CUDA: an artifact for ``sm_XY`` runs on every GPU of compute capability >= X.Y, nearest first.
  Our artifacts are model files (GGUF, safetensors, ONNX), not compiled kernels: what they need from
  the GPU is number formats and kernel families (bf16 from sm_80, fp8 from sm_89), and each capability
  has everything the lower ones have. CUDA's *binary* rule (a cubin runs only on the same major with an
  equal or higher minor; other majors need PTX JIT) concerns the runtime, which the device installs
  built for its own GPU. The nearest level ranks first because that artifact was tuned for that class
  of GPU (dtype and size). A target that shipped compiled engines (TensorRT plans) would need an
  exact-match rule instead; none in the catalog does.
* CPU: x86-64-v4 (AVX-512) > v3 (AVX2) > baseline; arm64 with dot product > arm64 baseline.
* Memory budget: dedicated GPU memory for CUDA targets (summed over the GPUs that can run the target,
  since llama.cpp and transformers' ``device_map`` split a model across GPUs), unified memory for
  Jetson and Apple (Metal gets about 2/3-3/4 of RAM), available host memory for CPU targets
  (``MemAvailable``, limited by the cgroup memory limit inside containers). An unknown budget does not
  exclude an artifact.
"""

from __future__ import annotations

import numbers
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .errors import SlmpkgError, UsageError

__all__ = [
    "KiB",
    "MiB",
    "GiB",
    "Target",
    "TARGETS",
    "TARGETS_BY_NAME",
    "get_target",
    "Gpu",
    "Host",
    "detect_host",
    "parse_cpuinfo",
    "parse_meminfo",
    "parse_nvidia_smi",
    "parse_cgroup_memory",
    "jetson_gpu",
    "NVIDIA_SMI_COMMAND",
    "is_compatible",
    "compatible_targets",
    "memory_budget",
    "Candidate",
    "rank_artifacts",
    "choose_artifact",
    "NoCompatibleTarget",
    "format_size",
    "targets_document",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3


# --------------------------------------------------------------------------------------------------
# the catalog
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One hardware target of the catalog.

    ``arch`` is the host CPU architecture the target needs (``None``: any, e.g. CUDA servers come as
    x86_64 and as arm64 like GH200); ``cpu_features`` use Linux ``/proc/cpuinfo`` names;
    ``compute_capability`` is the lowest CUDA capability it runs on; ``device`` a board the host must be
    (``"jetson-orin"``). ``format``/``quantization`` are the defaults a pipeline builds for it, and
    ``why`` says in one line why.

    >>> get_target("cuda-sm80").format, get_target("cuda-sm80").quantization
    ('safetensors', 'BF16')
    """

    name: str
    accelerator: str  # "cpu", "cuda" or "metal"
    arch: Optional[str]
    runtime: str
    format: str  # "gguf", "safetensors" or "onnx"
    quantization: str  # a slmpkg.presets name; for ONNX the GGUF type mapped to MatMulNBits
    description: str
    why: str
    cpu_features: frozenset[str] = frozenset()
    compute_capability: Optional[tuple[int, int]] = None
    device: Optional[str] = None

    @property
    def is_gpu(self) -> bool:
        return self.accelerator != "cpu"

    def runs_on(self, host: "Host") -> bool:
        """True if this target's artifacts run on ``host`` (see :func:`is_compatible`)."""
        return is_compatible(self, host)

    def to_dict(self) -> dict[str, Any]:
        cc = self.compute_capability
        return {
            "name": self.name,
            "accelerator": self.accelerator,
            "arch": self.arch,
            "cpu_features": sorted(self.cpu_features),
            "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
            "device": self.device,
            "runtime": self.runtime,
            "format": self.format,
            "quantization": self.quantization,
            "description": self.description,
            "why": self.why,
        }


# x86-64 micro-architecture levels of the psABI (what glibc-hwcaps and `-march=x86-64-vN` use), spelled
# as Linux /proc/cpuinfo flags: pni = SSE3, abm = LZCNT, xsave stands for OSXSAVE (Linux hides the flag
# when the OS does not enable it). Each level includes the one below.
X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
X86_64_V3 = X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cuda(cc: tuple[int, int], gpus: str, fmt: str, quant: str, runtime: str, why: str) -> Target:
    return Target(
        name=f"cuda-sm{cc[0]}{cc[1]}",
        accelerator="cuda",
        arch=None,
        compute_capability=cc,
        runtime=runtime,
        format=fmt,
        quantization=quant,
        description=f"NVIDIA GPU, compute capability {cc[0]}.{cc[1]} or newer ({gpus})",
        why=why,
    )


_TRANSFORMERS = "transformers / vLLM (CUDA)"
_ORT_GENAI = "onnxruntime-genai (CUDA)"

#: The catalog, in preference order: :func:`compatible_targets` keeps this order, so within each group
#: the most specific target comes first (GPU before CPU, newer CUDA before older, v4 before v3).
TARGETS: tuple[Target, ...] = (
    Target(
        name="apple-metal",
        accelerator="metal",
        arch="arm64",
        runtime="llama.cpp (Metal)",
        format="gguf",
        quantization="Q4_K_M",
        description="Apple Silicon GPU through Metal (M1 and later), unified memory",
        why="llama.cpp's Metal kernels handle K-quants well and 4-bit leaves unified memory to the rest of the Mac",
    ),
    Target(
        name="jetson-orin",
        accelerator="cuda",
        arch="arm64",
        device="jetson-orin",
        compute_capability=(8, 7),
        runtime="llama.cpp (CUDA, JetPack)",
        format="gguf",
        quantization="Q4_K_M",
        description="NVIDIA Jetson AGX Orin / Orin NX / Orin Nano: arm64 + integrated sm_87 GPU, unified memory",
        why="8-64 GB of LPDDR5 shared with the CPU at 68-205 GB/s: 4-bit weights, and llama.cpp builds on JetPack as is",
    ),
    _cuda((9, 0), "H100, H200, GH200", "safetensors", "BF16", _TRANSFORMERS,
          "80+ GB of HBM holds any small model unquantized, so keep full bf16 quality"),
    _cuda((8, 9), "L4, L40S, RTX 40xx, RTX 6000 Ada", "onnx", "Q4_0", _ORT_GENAI,
          "inference cards bound by memory bandwidth (L4: 300 GB/s): int4 MatMulNBits reads ~3.5x fewer bytes than bf16"),
    _cuda((8, 6), "A10, A40, RTX 30xx, RTX A6000", "safetensors", "BF16", _TRANSFORMERS,
          "Ampere has bf16 tensor cores and 24-48 GB on the server cards: an SLM fits unquantized"),
    _cuda((8, 0), "A100, A30", "safetensors", "BF16", _TRANSFORMERS,
          "bf16 tensor cores start here and 40/80 GB hold any small model unquantized"),
    _cuda((7, 5), "T4, RTX 20xx", "onnx", "Q4_0", _ORT_GENAI,
          "no bf16 on Turing and 16 GB on a T4: int4 MatMulNBits (symmetric, block 32) quarters fp16 memory"),
    _cuda((7, 0), "V100", "safetensors", "F16", _TRANSFORMERS,
          "Volta has fp16 tensor cores but no bf16, and 16/32 GB holds an SLM in fp16"),
    Target(
        name="cpu-x86_64-avx512",
        accelerator="cpu",
        arch="x86_64",
        cpu_features=X86_64_V4,
        runtime="llama.cpp (CPU)",
        format="gguf",
        quantization="Q4_K_M",
        description="x86-64-v4: AVX-512 F/BW/CD/DQ/VL (Skylake-SP and later Xeons, Zen 4 and later)",
        why="llama.cpp's K-quant dot products have AVX-512 paths; the same preset as AVX2 keeps one quality point",
    ),
    Target(
        name="cpu-x86_64-avx2",
        accelerator="cpu",
        arch="x86_64",
        cpu_features=X86_64_V3,
        runtime="llama.cpp (CPU)",
        format="gguf",
        quantization="Q4_K_M",
        description="x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE (Haswell and later, Zen and later)",
        why="Q4_K_M is llama.cpp's recommended size/quality balance and AVX2 has fast K-quant dot products",
    ),
    Target(
        name="cpu-x86_64",
        accelerator="cpu",
        arch="x86_64",
        runtime="llama.cpp (CPU)",
        format="gguf",
        quantization="Q4_0",
        description="any 64-bit x86 CPU (baseline SSE2: Atom, Celeron, pre-Haswell)",
        why="without AVX2 the K-quant kernels lose their SIMD paths; Q4_0 has the cheapest dequantization",
    ),
    Target(
        name="cpu-arm64-dotprod",
        accelerator="cpu",
        arch="arm64",
        cpu_features=frozenset({"asimddp"}),
        runtime="llama.cpp (CPU)",
        format="gguf",
        quantization="Q4_0",
        description="ARMv8.2+ with SDOT/UDOT (Graviton2 and later, Ampere Altra, Raspberry Pi 5, Apple M-series)",
        why="llama.cpp repacks Q4_0 at load into interleaved blocks for SDOT/i8mm, its fastest ARM CPU path",
    ),
    Target(
        name="cpu-arm64",
        accelerator="cpu",
        arch="arm64",
        runtime="llama.cpp (CPU)",
        format="gguf",
        quantization="Q4_0",
        description="any ARMv8-A 64-bit CPU with NEON (Raspberry Pi 4, Cortex-A53/A72)",
        why="small cores with little bandwidth: Q4_0 has the cheapest NEON dequantization",
    ),
)

TARGETS_BY_NAME: dict[str, Target] = {t.name: t for t in TARGETS}


def get_target(name: Union[str, Target]) -> Target:
    """The catalog target called ``name``.

    >>> get_target("cuda-sm75").compute_capability
    (7, 5)
    """
    if isinstance(name, Target):
        return name
    try:
        return TARGETS_BY_NAME[name]
    except KeyError:
        raise UsageError(f"unknown hardware target '{name}'; valid targets: {', '.join(TARGETS_BY_NAME)}") from None


# --------------------------------------------------------------------------------------------------
# the host
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU. ``memory`` is dedicated memory in bytes; ``None`` when unknown or for an integrated GPU
    that shares host memory (``integrated=True``: Jetson, Apple)."""

    kind: str = "cuda"  # "cuda" or "metal"
    compute_capability: Optional[tuple[int, int]] = None
    memory: Optional[int] = None
    name: Optional[str] = None
    integrated: bool = False

    def to_dict(self) -> dict[str, Any]:
        cc = self.compute_capability
        return {
            "kind": self.kind,
            "name": self.name,
            "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
            "memory": self.memory,
            "integrated": self.integrated,
        }


def _normalize_arch(machine: str) -> str:
    # the same CPUs go by several names: Linux aarch64, macOS arm64, Windows AMD64/ARM64, BSD amd64
    m = machine.strip().lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "arm64"
    return m


@dataclass(frozen=True)
class Host:
    """What :func:`detect_host` found (or what a test builds by hand).

    ``arch`` is normalized (``x86_64``, ``arm64``, else as reported, e.g. ``armv7l``);
    ``cpu_features`` are lower-case ``/proc/cpuinfo`` flag names (on macOS mapped to them);
    memory sizes are bytes, ``None`` when unknown.

    >>> h = Host(arch="aarch64", cpu_features=["fp", "asimd", "asimddp"], memory_total=8 * GiB)
    >>> h.arch, [t.name for t in compatible_targets(h)]
    ('arm64', ['cpu-arm64-dotprod', 'cpu-arm64'])
    """

    arch: str
    cpu_features: frozenset[str] = frozenset()
    gpus: tuple[Gpu, ...] = ()
    memory_total: Optional[int] = None
    memory_available: Optional[int] = None
    system: str = "linux"
    cpu_model: Optional[str] = None
    device_model: Optional[str] = None
    device: Optional[str] = None  # a known board: "jetson-orin", "jetson-xavier", ...

    def __post_init__(self) -> None:
        # accept any iterables and spellings; frozen, hence object.__setattr__
        object.__setattr__(self, "arch", _normalize_arch(self.arch))
        object.__setattr__(self, "cpu_features", frozenset(f.lower() for f in self.cpu_features))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "system", self.system.lower())

    @property
    def model(self) -> Optional[str]:
        """The most telling model string: the board (Jetson, Raspberry Pi) if known, else the CPU."""
        return self.device_model or self.cpu_model

    @property
    def memory_budget(self) -> Optional[int]:
        """Host memory a CPU artifact may use: available memory if known, else the total."""
        return self.memory_available if self.memory_available is not None else self.memory_total

    @property
    def cuda_gpus(self) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.kind == "cuda" and g.compute_capability is not None)

    def describe(self) -> str:
        """One line for messages, e.g. ``x86_64 linux, CPU 'AMD EPYC' (cpu-x86_64-avx2), 2 CUDA GPUs: ...``."""
        parts = [f"{self.arch} {self.system}"]
        if self.device_model:
            parts.append(self.device_model)
        cpu = next((t.name for t in TARGETS if t.accelerator == "cpu" and is_compatible(t, self)), None)
        model = f"'{self.cpu_model}' " if self.cpu_model else ""
        parts.append(f"CPU {model}({cpu or 'no CPU target'})")
        if self.gpus:
            shown = []
            for g in self.gpus:
                what = g.name or g.kind
                if g.compute_capability:
                    what += f" sm_{g.compute_capability[0]}{g.compute_capability[1]}"
                what += " (unified memory)" if g.integrated else f" {format_size(g.memory)}"
                shown.append(what)
            parts.append(f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''}: {', '.join(shown)}")
        else:
            parts.append("no GPU")
        if self.memory_available is not None and self.memory_total is not None:
            parts.append(f"memory {format_size(self.memory_available)} available of {format_size(self.memory_total)}")
        else:
            parts.append(f"memory {format_size(self.memory_budget)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "arch": self.arch,
            "cpu_model": self.cpu_model,
            "device_model": self.device_model,
            "device": self.device,
            "cpu_features": sorted(self.cpu_features),
            "gpus": [g.to_dict() for g in self.gpus],
            "memory_total": self.memory_total,
            "memory_available": self.memory_available,
        }


# ---- parsers (pure functions over file contents / command output, so tests feed them samples) ----

# CPU names lscpu would show for ARM cores that print no "model name" in /proc/cpuinfo
# (key: (implementer, part)); only used for display
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0xc0", "0xac3"): "Ampere-1",
}


def parse_cpuinfo(text: str) -> tuple[frozenset[str], Optional[str]]:
    """CPU features and model name from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``).

    A feature counts only if every processor lists it: the scheduler may move a thread to any core.

    >>> parse_cpuinfo("processor : 0\\nmodel name : Xeon\\nflags : sse2 avx2\\n\\nprocessor : 1\\nflags : sse2\\n")
    (frozenset({'sse2'}), 'Xeon')
    """
    common: Optional[set[str]] = None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features"):
            flags = set(value.lower().split())
            common = flags if common is None else common & flags
        elif key not in fields:
            fields[key] = value
    # x86 says "model name"; on ARM "Model" is the board (Raspberry Pi) while x86's "model" is a number
    model = fields.get("model name") or None
    if model is None and fields.get("model") and not fields["model"].isdigit():
        model = fields["model"]
    if model is None:
        # ARM servers print no name: lscpu's table of implementer/part ids, else the SoC ("Hardware")
        part = _ARM_PARTS.get((fields.get("cpu implementer", "").lower(), fields.get("cpu part", "").lower()))
        model = part or fields.get("hardware") or None
    return frozenset(common or ()), model


def parse_meminfo(text: str) -> tuple[Optional[int], Optional[int]]:
    """``(MemTotal, MemAvailable)`` in bytes from ``/proc/meminfo`` (``None`` for a missing line).

    >>> parse_meminfo("MemTotal:  16384 kB\\nMemFree: 1 kB\\nMemAvailable: 8192 kB\\n")
    (16777216, 8388608)
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\w+):\s*(\d+)\s*(kB)?", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return values.get("MemTotal"), values.get("MemAvailable")


#: What :func:`detect_host` runs; ``name`` comes last so a comma in a GPU name cannot shift the columns.
NVIDIA_SMI_COMMAND = ("nvidia-smi", "--query-gpu=compute_cap,memory.total,name", "--format=csv,noheader")

_MEM_UNITS = {"": MiB, "kib": KiB, "mib": MiB, "gib": GiB, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """GPUs from ``nvidia-smi --query-gpu=compute_cap,memory.total[,name] --format=csv,noheader``.

    One line per GPU (``8.0, 81920 MiB``); ``[N/A]`` becomes ``None``; lines that are not GPU rows
    (an error message printed instead) are skipped.

    >>> parse_nvidia_smi("7.5, 15360 MiB, Tesla T4\\n")[0]
    Gpu(kind='cuda', compute_capability=(7, 5), memory=16106127360, name='Tesla T4', integrated=False)
    """
    gpus = []
    for line in text.splitlines():
        cols = [c.strip() for c in line.split(",", 2)]
        if len(cols) < 2:
            continue
        cc_m = re.fullmatch(r"(\d+)\.(\d+)", cols[0])
        mem_m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?", cols[1], re.IGNORECASE)
        cc_na, mem_na = cols[0].startswith("["), cols[1].startswith("[")  # [N/A], [Not Supported]
        if not (cc_m or cc_na) or not (mem_m or mem_na) or (cc_na and mem_na):
            continue
        cc = (int(cc_m.group(1)), int(cc_m.group(2))) if cc_m else None
        mem = int(float(mem_m.group(1)) * _MEM_UNITS[(mem_m.group(2) or "").lower()]) if mem_m else None
        name = cols[2] if len(cols) > 2 and cols[2] and not cols[2].startswith("[") else None
        gpus.append(Gpu(kind="cuda", compute_capability=cc, memory=mem, name=name))
    return tuple(gpus)


# Jetson SoCs (device-tree "compatible" strings) → board id and the integrated GPU's compute capability
_TEGRA = {
    "nvidia,tegra234": ("jetson-orin", (8, 7), "Orin"),
    "nvidia,tegra194": ("jetson-xavier", (7, 2), "Xavier"),
    "nvidia,tegra186": ("jetson-tx2", (6, 2), "TX2"),
    "nvidia,tegra210": ("jetson-nano", (5, 3), "Tegra X1"),
}


def jetson_gpu(model: Optional[str], compatible: Optional[str] = None) -> tuple[Optional[str], Optional[Gpu]]:
    """``(device, integrated GPU)`` of a Jetson from ``/proc/device-tree/model`` and ``.../compatible``.

    The SoC in ``compatible`` is authoritative (carrier boards rename the model); the model string is
    the fallback.

    >>> jetson_gpu("NVIDIA Jetson AGX Orin Developer Kit\\x00")[0]
    'jetson-orin'
    """
    socs = [s.strip().lower() for s in (compatible or "").split("\x00")]
    for soc, (device, cc, gpu_name) in _TEGRA.items():
        if soc in socs:
            return device, Gpu(kind="cuda", compute_capability=cc, name=f"{gpu_name} (integrated)", integrated=True)
    text = (model or "").lower()
    if "jetson" in text:
        # dict order matters: "Jetson Orin Nano" is an Orin, so orin is tried before nano
        for device, cc, gpu_name in _TEGRA.values():
            key = device.split("-", 1)[1]
            if re.search(rf"\b{key}\b", text):
                return device, Gpu(kind="cuda", compute_capability=cc, name=f"{gpu_name} (integrated)", integrated=True)
    return None, None


def parse_cgroup_memory(
    limit: Optional[str], usage: Optional[str] = None, stat: Optional[str] = None
) -> tuple[Optional[int], Optional[int]]:
    """``(limit, free)`` in bytes from a cgroup's memory files (v2 ``memory.max``/``memory.current``/
    ``memory.stat``, v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``/``memory.stat``).

    ``free`` = limit - (usage - inactive file cache), the working-set rule kubelet evicts by: page cache
    counts in usage but is reclaimed before the OOM killer runs. No limit (``max``, or v1's huge
    number) gives ``(None, None)``.

    >>> parse_cgroup_memory("4294967296", "1073741824", "inactive_file 536870912\\n")
    (4294967296, 3758096384)
    """
    text = (limit or "").strip()
    if not text.isdigit() or int(text) >= 1 << 60:
        return None, None
    lim = int(text)
    if usage is None or not usage.strip().isdigit():
        return lim, None
    used = int(usage.strip())
    for line in (stat or "").splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
            used -= int(value.strip())
            break
    return lim, max(0, lim - max(0, used))


# ---- reading the real system ----

_REAL: Any = object()  # default of detect_host's probes: "read the real system"


def _read_text(path: Union[str, Path]) -> Optional[str]:
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _run(argv: Sequence[str], timeout: float = 10.0) -> Optional[str]:
    # absent binary, failure (nvidia-smi exits 9 without a driver), hang → None: the probe found nothing
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


_SYSCTL_KEYS = (
    "hw.optional.arm64",
    "hw.memsize",
    "machdep.cpu.brand_string",
    "hw.optional.arm.FEAT_DotProd",
    "machdep.cpu.features",
    "machdep.cpu.leaf7_features",
    "machdep.cpu.extfeatures",
)


def _real_sysctl() -> dict[str, str]:
    values = {}
    for key in _SYSCTL_KEYS:
        out = _run(["sysctl", "-n", key], timeout=5)
        if out is not None and out.strip():
            values[key] = out.strip()
    return values


def _real_cgroup_memory() -> Optional[dict[str, Optional[str]]]:
    """The memory files of the most limiting cgroup on this process's path (v2, else v1)."""
    cgroups = _read_text("/proc/self/cgroup")
    if cgroups is None:
        return None
    for line in cgroups.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            base, names = Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "memory.stat")
        elif "memory" in controllers.split(","):
            base, names = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat")
        else:
            continue
        # the effective limit is the smallest along the path; inside a cgroup namespace the path is "/"
        # and the mount root is the container's own cgroup
        best: Optional[tuple[int, Path]] = None
        here = base / path.lstrip("/")
        for d in (here, *here.parents):
            if len(d.parts) < len(base.parts):
                break
            limit, _ = parse_cgroup_memory(_read_text(d / names[0]))
            if limit is not None and (best is None or limit < best[0]):
                best = (limit, d)
        if best is not None:
            d = best[1]
            return {"limit": _read_text(d / names[0]), "usage": _read_text(d / names[1]), "stat": _read_text(d / names[2])}
    return None


# macOS spells Intel CPU features its own way; map the ones the x86-64 levels need to Linux names
_MAC_X86_FEATURES = {"sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx1.0": "avx", "lzcnt": "abm", "lahf": "lahf_lm"}


def _mac_features(sysctl: Mapping[str, str], arm64: bool) -> frozenset[str]:
    if arm64:
        feats = {"fp", "asimd"}
        brand = sysctl.get("machdep.cpu.brand_string", "")
        # every M-series core has SDOT; FEAT_DotProd is macOS 12+, the brand covers older systems
        if sysctl.get("hw.optional.arm.FEAT_DotProd", "").strip() == "1" or brand.startswith("Apple M"):
            feats.add("asimddp")
        return frozenset(feats)
    words = " ".join(sysctl.get(k, "") for k in ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures"))
    return frozenset(_MAC_X86_FEATURES.get(w, w) for w in words.lower().split())


def detect_host(
    *,
    machine: Optional[str] = _REAL,
    system: Optional[str] = _REAL,
    cpuinfo: Optional[str] = _REAL,
    meminfo: Optional[str] = _REAL,
    nvidia_smi: Optional[str] = _REAL,
    device_tree_model: Optional[str] = _REAL,
    device_tree_compatible: Optional[str] = _REAL,
    sysctl: Optional[Mapping[str, str]] = _REAL,
    cgroup_memory: Optional[Mapping[str, Optional[str]]] = _REAL,
) -> Host:
    """Probe this machine. Every probe is optional and can be injected: leave it out to read the real
    system, pass the content (file text, command stdout, a ``{sysctl key: value}`` mapping, a
    ``{"limit", "usage", "stat"}`` mapping of cgroup files) to use it, or ``None`` for "absent / failed".

    Probes: ``platform.machine()`` (``uname -m``), ``/proc/cpuinfo``, ``/proc/meminfo``, the cgroup
    memory limit, :data:`NVIDIA_SMI_COMMAND`, ``/proc/device-tree/model`` and ``compatible`` (Jetson),
    and on macOS ``sysctl`` (``hw.optional.arm64``, ``hw.memsize``, ``machdep.cpu.brand_string``...).
    Nothing raises: a probe that fails leaves its part unknown.

    >>> h = detect_host(machine="x86_64", system="Linux", cpuinfo="flags : sse2 avx2\\n",
    ...                 meminfo="MemTotal: 8388608 kB\\nMemAvailable: 4194304 kB\\n",
    ...                 nvidia_smi="8.0, 81920 MiB\\n8.0, 81920 MiB\\n", device_tree_model=None,
    ...                 device_tree_compatible=None, sysctl=None, cgroup_memory=None)
    >>> h.arch, len(h.gpus), h.memory_available == 4 * GiB
    ('x86_64', 2, True)
    """
    if system is _REAL:
        system = platform.system()
    system = (system or "unknown").lower()
    linux, darwin = system == "linux", system == "darwin"
    if machine is _REAL:
        machine = platform.machine()
    if cpuinfo is _REAL:
        cpuinfo = _read_text("/proc/cpuinfo") if linux else None
    if meminfo is _REAL:
        meminfo = _read_text("/proc/meminfo") if linux else None
    if cgroup_memory is _REAL:
        cgroup_memory = _real_cgroup_memory() if linux else None
    if device_tree_model is _REAL:
        device_tree_model = _read_text("/proc/device-tree/model") if linux else None
    if device_tree_compatible is _REAL:
        device_tree_compatible = _read_text("/proc/device-tree/compatible") if linux else None
    if sysctl is _REAL:
        sysctl = _real_sysctl() if darwin else None
    sysctl = sysctl or {}

    arch = _normalize_arch(machine or "unknown")
    # Rosetta 2 reports x86_64 to a translated process; hw.optional.arm64 tells the hardware
    mac_arm64 = sysctl.get("hw.optional.arm64", "").strip() == "1"
    if mac_arm64:
        arch = "arm64"

    features: frozenset[str] = frozenset()
    cpu_model: Optional[str] = None
    if cpuinfo:
        features, cpu_model = parse_cpuinfo(cpuinfo)
    if sysctl:
        if not features:
            features = _mac_features(sysctl, arch == "arm64")
        cpu_model = cpu_model or sysctl.get("machdep.cpu.brand_string")

    total = available = None
    if meminfo:
        total, available = parse_meminfo(meminfo)
    if total is None and sysctl.get("hw.memsize", "").strip().isdigit():
        total = int(sysctl["hw.memsize"].strip())  # macOS gives no "available" figure through sysctl
    if cgroup_memory:
        limit, free = parse_cgroup_memory(cgroup_memory.get("limit"), cgroup_memory.get("usage"), cgroup_memory.get("stat"))
        if limit is not None:
            total = limit if total is None else min(total, limit)
            if free is not None:
                available = free if available is None else min(available, free)

    model_text = device_tree_model.replace("\x00", "").strip() if device_tree_model else None
    device, igpu = jetson_gpu(model_text, device_tree_compatible)
    gpus: list[Gpu] = []
    if igpu is not None:
        # a Jetson's only GPU is the integrated one; nvidia-smi there (JetPack 6) reports no real
        # memory figure, so skip it rather than list the same GPU twice
        gpus.append(igpu)
    else:
        if nvidia_smi is _REAL:
            nvidia_smi = _run(NVIDIA_SMI_COMMAND)
        if nvidia_smi:
            gpus.extend(parse_nvidia_smi(nvidia_smi))
    if (darwin and arch == "arm64") or mac_arm64:
        gpus.append(Gpu(kind="metal", name=(cpu_model or "Apple Silicon") + " GPU", integrated=True))

    return Host(
        arch=arch,
        cpu_features=features,
        gpus=tuple(gpus),
        memory_total=total,
        memory_available=available,
        system=system,
        cpu_model=cpu_model,
        device_model=model_text or None,
        device=device,
    )


# --------------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------------


def is_compatible(target: Union[str, Target], host: Host) -> bool:
    """True if ``target``'s artifacts run on ``host``.

    CPU targets: same architecture and every required CPU feature present. CUDA targets: some GPU has
    compute capability >= the target's (model files, not kernels: see the module docstring); a
    ``device`` target (``jetson-orin``) also needs that board. Metal: an Apple Silicon GPU.
    """
    t = get_target(target)
    if t.arch is not None and t.arch != host.arch:
        return False
    if not t.cpu_features <= host.cpu_features:
        return False
    if t.device is not None and t.device != host.device:
        return False
    if t.accelerator == "metal":
        return any(g.kind == "metal" for g in host.gpus)
    if t.accelerator == "cuda":
        assert t.compute_capability is not None
        return any(g.compute_capability >= t.compute_capability for g in host.cuda_gpus)  # type: ignore[operator]
    return True


def compatible_targets(host: Host) -> list[Target]:
    """The catalog targets ``host`` runs, best first: GPU targets (board-specific, then CUDA from the
    nearest compute capability down), then CPU targets (x86-64-v4 > v3 > baseline; arm64 dotprod >
    baseline) as the fallback.

    >>> host = Host(arch="x86_64", gpus=[Gpu(compute_capability=(8, 9), memory=48 * GiB)])
    >>> [t.name for t in compatible_targets(host)]
    ['cuda-sm89', 'cuda-sm86', 'cuda-sm80', 'cuda-sm75', 'cuda-sm70', 'cpu-x86_64']
    """
    # TARGETS is kept in preference order, so filtering preserves the ranking
    return [t for t in TARGETS if is_compatible(t, host)]


def _metal_working_set(total: int) -> int:
    # approximately MTLDevice.recommendedMaxWorkingSetSize, the limit llama.cpp's Metal backend works
    # within: about 2/3 of RAM up to 36 GiB, 3/4 above (macOS's default GPU wired limit)
    return total * 2 // 3 if total <= 36 * GiB else total * 3 // 4


def memory_budget(target: Union[str, Target], host: Host) -> Optional[int]:
    """Bytes an artifact of ``target`` may take on ``host``; ``None`` when unknown.

    CPU targets: host memory (available, else total). CUDA targets: the dedicated memory of the GPUs
    that can run the target, summed (llama.cpp and transformers split layers across GPUs). Integrated
    GPUs (Jetson): host memory. Metal: the Metal working set (about 2/3-3/4 of RAM), within available
    memory when that is known.
    """
    t = get_target(target)
    if t.accelerator == "cpu":
        return host.memory_budget
    if t.accelerator == "metal":
        if host.memory_total is None:
            return host.memory_available
        ws = _metal_working_set(host.memory_total)
        return ws if host.memory_available is None else min(ws, host.memory_available)
    assert t.compute_capability is not None
    gpus = [g for g in host.cuda_gpus if g.compute_capability >= t.compute_capability]  # type: ignore[operator]
    if any(g.integrated for g in gpus):
        return host.memory_budget
    known = [g.memory for g in gpus if g.memory is not None]
    return sum(known) if known else None


@dataclass(frozen=True)
class Candidate:
    """The verdict on one published artifact: ``rank`` is its position in :func:`compatible_targets`
    (``None``: the host cannot run it); ``reason`` says why it was not chosen ("" when it fits)."""

    target: str
    size: Optional[int]
    rank: Optional[int]
    budget: Optional[int]
    fits: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "size": self.size, "rank": self.rank, "budget": self.budget,
                "fits": self.fits, "reason": self.reason}


def _size_of(name: str, value: Any) -> Optional[int]:
    # an int, an object with .size (a manifest), or a mapping with "size" (its JSON); None = unknown
    # (numbers.Real, not int/float: numpy integers have a .size of their own, 1)
    if isinstance(value, Mapping):
        value = value.get("size")
    elif value is not None and not isinstance(value, numbers.Real):
        value = getattr(value, "size", value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise UsageError(f"artifact for target '{name}': size must be a non-negative number of bytes, got {value!r}")
    return int(value)


def _why_not(t: Target, host: Host) -> str:
    if t.arch is not None and t.arch != host.arch:
        return f"needs an {t.arch} CPU"
    missing = t.cpu_features - host.cpu_features
    if missing:
        return f"needs CPU features {' '.join(sorted(missing))}"
    if t.device is not None and t.device != host.device:
        return f"needs a {t.device} board"
    if t.accelerator == "metal":
        return "needs an Apple Silicon GPU"
    cc = t.compute_capability
    return f"needs a CUDA GPU of compute capability >= {cc[0]}.{cc[1]}" if cc else "not supported"


def _budget_kind(t: Target, host: Host) -> str:
    if t.accelerator == "cpu":
        return "host memory"
    if t.accelerator == "metal":
        return "the Metal working set"
    integrated = any(g.integrated for g in host.cuda_gpus)
    return "unified memory" if integrated else "GPU memory"


def rank_artifacts(
    host: Host, available: Mapping[str, Any], max_memory: Optional[int] = None
) -> list[Candidate]:
    """Every published artifact judged for ``host``: compatible ones in rank order, then the others.

    ``available`` maps target names to artifact sizes in bytes (or objects with ``.size``, or mappings
    with ``"size"``; ``None`` = unknown size, never excluded). ``max_memory`` replaces the detected
    budget for every target. Names outside the catalog are reported, never chosen.
    """
    if max_memory is not None and (isinstance(max_memory, bool) or max_memory <= 0):
        raise UsageError(f"max memory must be a positive number of bytes, got {max_memory!r}")
    ranked = {t.name: i for i, t in enumerate(compatible_targets(host))}
    out: list[Candidate] = []
    for name, value in available.items():
        size = _size_of(name, value)
        target = TARGETS_BY_NAME.get(name)
        if target is None:
            out.append(Candidate(name, size, None, None, False, "not a known hardware target"))
            continue
        if name not in ranked:
            out.append(Candidate(name, size, None, None, False, _why_not(target, host)))
            continue
        budget = max_memory if max_memory is not None else memory_budget(target, host)
        fits = size is None or budget is None or size <= budget
        where = "the memory limit" if max_memory is not None else _budget_kind(target, host)
        reason = "" if fits else f"exceeds {where} ({format_size(budget)})"
        out.append(Candidate(name, size, ranked[name], budget, fits, reason))
    # compatible in rank order first; the rest keep the caller's order (sorted is stable)
    return sorted(out, key=lambda c: (c.rank is None, c.rank if c.rank is not None else 0))


class NoCompatibleTarget(SlmpkgError):
    """No published artifact runs on this host within its memory budget. The message names the host,
    each artifact with why it was refused, and the targets the host would run; ``host`` and
    ``candidates`` keep the details for ``--json``."""

    def __init__(self, message: str, host: Host, candidates: Sequence[Candidate]):
        super().__init__(message)
        self.host = host
        self.candidates = list(candidates)


def choose_artifact(host: Host, available: Mapping[str, Any], max_memory: Optional[int] = None) -> str:
    """The name of the best-ranked published target that runs on ``host`` and fits its memory budget
    (GPU memory for GPU targets, host memory for CPU targets; ``max_memory`` overrides both).

    Raises :class:`NoCompatibleTarget` when nothing qualifies.

    >>> pi = Host(arch="aarch64", cpu_features=["fp", "asimd"], memory_available=3 * GiB)
    >>> choose_artifact(pi, {"cpu-arm64-dotprod": GiB, "cpu-arm64": 2 * GiB, "cuda-sm80": GiB})
    'cpu-arm64'
    """
    candidates = rank_artifacts(host, available, max_memory)
    for c in candidates:
        if c.rank is not None and c.fits:
            return c.target
    runs = ", ".join(t.name for t in compatible_targets(host)) or "none"
    if candidates:
        refused = "; ".join(
            f"{c.target}{f' ({format_size(c.size)})' if c.size is not None else ''}: {c.reason}" for c in candidates)
        what = f"none of the {len(candidates)} published artifacts fits: {refused}"
    else:
        what = "no artifacts are published"
    raise NoCompatibleTarget(
        f"no artifact for this host ({host.describe()}): {what}; this host runs: {runs}", host, candidates)


# --------------------------------------------------------------------------------------------------
# sizes and the CLI document
# --------------------------------------------------------------------------------------------------

def format_size(n: Optional[int]) -> str:
    """``'15.0 GiB'``; ``'unknown'`` for ``None``."""
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def targets_document(host: Optional[Host] = None) -> dict[str, Any]:
    """The ``slmpkg targets --json`` document: the catalog, and with a host (``--detect``) the host,
    the compatible targets best first, and per target whether it runs, its rank and memory budget.

    >>> doc = targets_document(Host(arch="arm64", memory_total=4 * GiB))
    >>> doc["compatible"], doc["targets"][-1]["rank"], doc["targets"][-1]["memory_budget"]
    (['cpu-arm64'], 0, 4294967296)
    """
    doc: dict[str, Any] = {}
    targets = [t.to_dict() for t in TARGETS]
    if host is not None:
        ranked = compatible_targets(host)
        doc["host"] = host.to_dict()
        doc["compatible"] = [t.name for t in ranked]
        for entry, t in zip(targets, TARGETS, strict=True):
            entry["compatible"] = t in ranked
            entry["rank"] = ranked.index(t) if t in ranked else None
            entry["memory_budget"] = memory_budget(t, host) if t in ranked else None
    doc["targets"] = targets
    return doc
