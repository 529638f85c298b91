"""Hardware targets: catalog, host detection from recorded probe outputs, ranking and artifact choice.

Every probe is fed real-looking samples (cpuinfo, nvidia-smi, device tree, sysctl), so the tests are
fast and give the same answer on any machine; one test runs the real probes on this machine.
"""

from __future__ import annotations

import json
import platform
import sys
from types import SimpleNamespace

import pytest

from slmpkg.errors import SlmpkgError, UsageError
from slmpkg.targets import (
    TARGETS,
    GiB,
    Gpu,
    Host,
    MiB,
    NoCompatibleTarget,
    _run,
    choose_artifact,
    compatible_targets,
    detect_host,
    format_size,
    get_target,
    jetson_gpu,
    memory_budget,
    parse_cgroup_memory,
    parse_cpuinfo,
    parse_meminfo,
    parse_nvidia_smi,
    rank_artifacts,
    targets_document,
)

# ---- samples -------------------------------------------------------------------------------------

_X86_HEAD = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni "
    "pclmulqdq ssse3"
)

# AWS m4 (Broadwell): x86-64-v3, no AVX-512
XEON_AVX2_FLAGS = (
    f"{_X86_HEAD} fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c "
    "rdrand hypervisor lahf_lm abm 3dnowprefetch cpuid_fault invpcid_single pti fsgsbase bmi1 hle avx2 smep "
    "bmi2 erms invpcid rtm rdseed adx xsaveopt"
)
# AWS m6i (Ice Lake): x86-64-v4
XEON_AVX512_FLAGS = (
    f"{_X86_HEAD} fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c "
    "rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase "
    "tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb "
    "avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves wbnoinvd ida arat avx512vbmi pku ospke "
    "avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq rdpid md_clear "
    "flush_l1d arch_capabilities"
)
# Sandy Bridge: AVX but no AVX2/FMA/F16C/BMI → baseline only
SANDY_BRIDGE_FLAGS = (
    f"{_X86_HEAD} cx16 pcid sse4_1 sse4_2 x2apic popcnt tsc_deadline_timer aes xsave avx hypervisor lahf_lm "
    "pti xsaveopt"
)


def x86_cpuinfo(model: str, flags: str, n: int = 2) -> str:
    return "".join(
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 79\n"
        f"model name\t: {model}\nstepping\t: 1\ncpu MHz\t\t: 2300.000\ncache size\t: 46080 KB\n"
        f"flags\t\t: {flags}\nbugs\t\t: cpu_meltdown spectre_v1\nbogomips\t: 4600.00\n\n"
        for i in range(n)
    )


XEON_AVX2 = x86_cpuinfo("Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz", XEON_AVX2_FLAGS)
XEON_AVX512 = x86_cpuinfo("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", XEON_AVX512_FLAGS)
SANDY_BRIDGE = x86_cpuinfo("Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz", SANDY_BRIDGE_FLAGS)

GRAVITON2 = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 243.75\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n"
    "CPU revision\t: 1\n\n"
    for i in range(4)
)
RASPBERRY_PI_4 = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
    for i in range(4)
) + "Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: 10000000a1b2c3d4\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
JETSON_ORIN_CPUINFO = "".join(
    f"processor\t: {i}\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nBogoMIPS\t: 62.50\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp uscat ilrcpc flagm paca pacg\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
    "CPU part\t: 0xd42\nCPU revision\t: 1\n\n"
    for i in range(12)
)

MEMINFO_64G = "MemTotal:       65536000 kB\nMemFree:        1000000 kB\nMemAvailable:   60000000 kB\nBuffers:  1 kB\n"
MEMINFO_4G = "MemTotal:        3884152 kB\nMemFree:          812340 kB\nMemAvailable:    3101236 kB\n"

SMI_T4 = "7.5, 15360 MiB, Tesla T4\n"
SMI_2xA100 = "8.0, 81920 MiB, NVIDIA A100-SXM4-80GB\n8.0, 81920 MiB, NVIDIA A100-SXM4-80GB\n"
SMI_RTX6000_ADA = "8.9, 49140 MiB, NVIDIA RTX 6000 Ada Generation\n"
SMI_NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
    "NVIDIA driver is installed and running.\n"
)

ORIN_MODEL = "NVIDIA Jetson AGX Orin Developer Kit\x00"
ORIN_COMPATIBLE = "nvidia,p3737-0000+p3701-0005\x00nvidia,p3701-0005\x00nvidia,tegra234\x00"

MAC_M2_PRO = {
    "hw.optional.arm64": "1",
    "hw.memsize": "34359738368",
    "machdep.cpu.brand_string": "Apple M2 Pro",
    "hw.optional.arm.FEAT_DotProd": "1",
}
MAC_INTEL_I9 = {
    "hw.memsize": "17179869184",
    "machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz",
    "machdep.cpu.features": (
        "FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH DS ACPI MMX FXSR SSE SSE2 "
        "SS HTT TM PBE SSE3 PCLMULQDQ DTES64 MON DSCPL VMX SMX EST TM2 SSSE3 FMA CX16 TPR PDCM SSE4.1 SSE4.2 "
        "x2APIC MOVBE POPCNT AES PCID XSAVE OSXSAVE SEGLIM64 TSCTMR AVX1.0 RDRAND F16C"
    ),
    "machdep.cpu.leaf7_features": (
        "RDWRFSGS TSC_THREAD_OFFSET SGX BMI1 HLE AVX2 SMEP BMI2 ERMS INVPCID RTM FPU_CSDS MPX RDSEED ADX SMAP "
        "CLFSOPT IPT MDCLEAR TSXFA IBRS STIBP L1DF SSBD"
    ),
    "machdep.cpu.extfeatures": "SYSCALL XD 1GBPAGE EM64T LAHF LZCNT PREFETCHW RDTSCP TSCI",
}


def linux(machine="x86_64", cpuinfo=None, meminfo=MEMINFO_64G, nvidia_smi=None, model=None, compatible=None, cgroup=None):
    """detect_host on recorded Linux probe outputs only (nothing from this machine)."""
    return detect_host(machine=machine, system="Linux", cpuinfo=cpuinfo, meminfo=meminfo, nvidia_smi=nvidia_smi,
                       device_tree_model=model, device_tree_compatible=compatible, sysctl=None, cgroup_memory=cgroup)


def mac(machine, sysctl):
    return detect_host(machine=machine, system="Darwin", cpuinfo=None, meminfo=None, nvidia_smi=None,
                       device_tree_model=None, device_tree_compatible=None, sysctl=sysctl, cgroup_memory=None)


def names(host):
    return [t.name for t in compatible_targets(host)]


# ---- catalog -------------------------------------------------------------------------------------


def test_catalog_names_and_fields():
    assert [t.name for t in TARGETS] == [
        "apple-metal", "jetson-orin", "cuda-sm90", "cuda-sm89", "cuda-sm86", "cuda-sm80", "cuda-sm75",
        "cuda-sm70", "cpu-x86_64-avx512", "cpu-x86_64-avx2", "cpu-x86_64", "cpu-arm64-dotprod", "cpu-arm64",
    ]
    for t in TARGETS:
        assert t.format in ("gguf", "safetensors", "onnx")
        assert t.description and t.why and "\n" not in t.why and t.runtime
        if t.name.startswith("cuda-sm"):
            assert t.name == "cuda-sm{}{}".format(*t.compute_capability) and t.arch is None
    assert get_target("jetson-orin").compute_capability == (8, 7) and get_target("jetson-orin").arch == "arm64"
    assert {"avx2", "fma", "f16c", "bmi2"} <= get_target("cpu-x86_64-avx2").cpu_features
    assert get_target("cpu-x86_64-avx2").cpu_features < get_target("cpu-x86_64-avx512").cpu_features
    assert get_target("cpu-arm64-dotprod").cpu_features == {"asimddp"}


def test_catalog_defaults_are_real_presets():
    from slmpkg.presets import PRESETS

    for t in TARGETS:
        assert t.quantization in PRESETS, t.name
    assert get_target("cpu-x86_64-avx2").quantization == "Q4_K_M"
    assert get_target("cpu-arm64").quantization == "Q4_0"
    assert (get_target("cuda-sm90").format, get_target("cuda-sm90").quantization) == ("safetensors", "BF16")
    # no bf16 before Ampere
    assert get_target("cuda-sm70").quantization != "BF16" and get_target("cuda-sm75").quantization != "BF16"


def test_unknown_target_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown hardware target 'cuda-sm61'.*cuda-sm70"):
        get_target("cuda-sm61")


# ---- CPU probes ----------------------------------------------------------------------------------


def test_cpuinfo_avx2_xeon():
    features, model = parse_cpuinfo(XEON_AVX2)
    assert model == "Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz"
    assert {"avx2", "fma", "bmi2"} <= features and "avx512f" not in features
    assert names(linux(cpuinfo=XEON_AVX2)) == ["cpu-x86_64-avx2", "cpu-x86_64"]


def test_cpuinfo_avx512_server():
    host = linux(cpuinfo=XEON_AVX512)
    assert names(host) == ["cpu-x86_64-avx512", "cpu-x86_64-avx2", "cpu-x86_64"]


def test_cpuinfo_x86_without_avx2_is_baseline():
    host = linux(cpuinfo=SANDY_BRIDGE)
    assert "avx" in host.cpu_features and "avx2" not in host.cpu_features
    assert names(host) == ["cpu-x86_64"]


def test_cpuinfo_feature_must_be_on_every_core():
    # one core without avx2 (a hypervisor masking it): a thread may land there
    text = x86_cpuinfo("x", XEON_AVX2_FLAGS, 1) + x86_cpuinfo("x", XEON_AVX2_FLAGS.replace(" avx2", ""), 1)
    assert "avx2" not in parse_cpuinfo(text)[0]


def test_cpuinfo_graviton2_has_dotprod():
    host = linux(machine="aarch64", cpuinfo=GRAVITON2)
    assert host.arch == "arm64" and host.cpu_model == "Neoverse-N1"
    assert names(host) == ["cpu-arm64-dotprod", "cpu-arm64"]


def test_cpuinfo_raspberry_pi_4_without_dotprod():
    host = linux(machine="aarch64", cpuinfo=RASPBERRY_PI_4, meminfo=MEMINFO_4G)
    assert host.cpu_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert names(host) == ["cpu-arm64"]
    # a 32-bit Raspberry Pi OS reports armv7l: no catalog target runs there
    assert names(linux(machine="armv7l", cpuinfo=RASPBERRY_PI_4)) == []


def test_missing_probes_still_give_the_baseline():
    host = linux(cpuinfo=None, meminfo=None)
    assert host.cpu_features == frozenset() and host.memory_total is None and host.gpus == ()
    assert names(host) == ["cpu-x86_64"]
    assert names(Host(arch="AMD64")) == ["cpu-x86_64"]  # Windows spelling


def test_meminfo():
    assert parse_meminfo(MEMINFO_4G) == (3884152 * 1024, 3101236 * 1024)
    assert parse_meminfo("MemTotal: 1024 kB\n") == (1024 * 1024, None)  # kernels before 3.14
    host = linux(meminfo=MEMINFO_4G)
    assert host.memory_budget == 3101236 * 1024


def test_cgroup_limit_caps_host_memory():
    assert parse_cgroup_memory("max") == (None, None)
    assert parse_cgroup_memory("9223372036854771712", "100") == (None, None)  # v1 "no limit"
    # page cache (inactive_file) is reclaimable and does not count against the limit
    stat = "anon 1073741824\nfile 2147483648\ninactive_file 1073741824\nactive_file 1073741824\n"
    assert parse_cgroup_memory("4294967296\n", "3221225472\n", stat) == (4 * GiB, 2 * GiB)
    host = linux(meminfo=MEMINFO_64G, cgroup={"limit": "4294967296\n", "usage": "3221225472\n", "stat": stat})
    assert host.memory_total == 4 * GiB and host.memory_available == 2 * GiB
    unlimited = linux(meminfo=MEMINFO_64G, cgroup={"limit": "max\n", "usage": "1\n", "stat": ""})
    assert unlimited.memory_total == 65536000 * 1024


# ---- GPU probes ----------------------------------------------------------------------------------


def test_nvidia_smi_t4():
    (gpu,) = parse_nvidia_smi(SMI_T4)
    assert gpu == Gpu(kind="cuda", compute_capability=(7, 5), memory=15360 * MiB, name="Tesla T4")
    host = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_T4)
    assert names(host) == ["cuda-sm75", "cuda-sm70", "cpu-x86_64-avx2", "cpu-x86_64"]


def test_nvidia_smi_two_a100s():
    gpus = parse_nvidia_smi(SMI_2xA100)
    assert [g.compute_capability for g in gpus] == [(8, 0), (8, 0)]
    assert parse_nvidia_smi("8.0, 81920 MiB\n8.0, 81920 MiB\n")[1].memory == 80 * GiB  # two-column query
    host = linux(cpuinfo=XEON_AVX512, nvidia_smi=SMI_2xA100)
    assert names(host)[:4] == ["cuda-sm80", "cuda-sm75", "cuda-sm70", "cpu-x86_64-avx512"]
    assert "cuda-sm86" not in names(host)
    assert memory_budget("cuda-sm80", host) == 160 * GiB  # layers split across both GPUs


def test_nvidia_smi_rtx_6000_ada_runs_every_older_cuda_target():
    host = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_RTX6000_ADA)
    assert host.gpus[0].name == "NVIDIA RTX 6000 Ada Generation"
    assert names(host) == ["cuda-sm89", "cuda-sm86", "cuda-sm80", "cuda-sm75", "cuda-sm70",
                           "cpu-x86_64-avx2", "cpu-x86_64"]


def test_nvidia_smi_failure_means_no_gpu():
    assert parse_nvidia_smi(SMI_NO_DRIVER) == ()
    assert parse_nvidia_smi('Field "compute_cap" is not a valid field to query.\n') == ()
    assert parse_nvidia_smi("") == ()
    assert linux(nvidia_smi=None).gpus == ()
    assert linux(nvidia_smi=SMI_NO_DRIVER).gpus == ()


def test_run_returns_none_for_missing_or_failing_commands():
    assert _run(["slmpkg-no-such-binary-xyz", "--version"]) is None
    assert _run([sys.executable, "-c", "import sys; print('8.0, 1 MiB'); sys.exit(9)"]) is None
    assert _run([sys.executable, "-c", "print('7.5, 15360 MiB')"]).strip() == "7.5, 15360 MiB"


def test_nvidia_smi_not_available_fields():
    (gpu,) = parse_nvidia_smi("8.7, [N/A], Orin\n")
    assert gpu.compute_capability == (8, 7) and gpu.memory is None
    # unknown memory never excludes an artifact
    host = Host(arch="x86_64", gpus=[gpu], memory_available=GiB)
    assert memory_budget("cuda-sm80", host) is None
    assert choose_artifact(host, {"cuda-sm80": 100 * GiB}) == "cuda-sm80"


def test_old_and_new_gpus():
    pascal = Host(arch="x86_64", gpus=[Gpu(compute_capability=(6, 1), memory=24 * GiB)])
    assert names(pascal) == ["cpu-x86_64"]
    blackwell = Host(arch="x86_64", gpus=[Gpu(compute_capability=(12, 0), memory=32 * GiB)])
    assert names(blackwell)[0] == "cuda-sm90"
    gh200 = linux(machine="aarch64", cpuinfo=GRAVITON2, nvidia_smi="9.0, 97871 MiB, NVIDIA GH200 480GB\n")
    assert names(gh200) == ["cuda-sm90", "cuda-sm89", "cuda-sm86", "cuda-sm80", "cuda-sm75", "cuda-sm70",
                            "cpu-arm64-dotprod", "cpu-arm64"]


# ---- Jetson and macOS ----------------------------------------------------------------------------


def test_jetson_orin_from_device_tree():
    host = linux(machine="aarch64", cpuinfo=JETSON_ORIN_CPUINFO, model=ORIN_MODEL, compatible=ORIN_COMPATIBLE,
                 nvidia_smi="8.7, [N/A], Orin\n")
    assert host.device == "jetson-orin" and host.model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert len(host.gpus) == 1 and host.gpus[0].integrated  # nvidia-smi's copy of the iGPU is not added
    assert names(host) == ["jetson-orin", "cuda-sm86", "cuda-sm80", "cuda-sm75", "cuda-sm70",
                           "cpu-arm64-dotprod", "cpu-arm64"]
    # unified memory: the GPU budget is host memory
    assert memory_budget("jetson-orin", host) == memory_budget("cuda-sm80", host) == 60000000 * 1024


def test_jetson_model_strings():
    assert jetson_gpu("NVIDIA Jetson Orin Nano Developer Kit")[0] == "jetson-orin"
    assert jetson_gpu("NVIDIA Jetson Xavier NX Developer Kit")[1].compute_capability == (7, 2)
    assert jetson_gpu("Raspberry Pi 5 Model B Rev 1.0") == (None, None)
    # a carrier board renames the model; the SoC in "compatible" still says Orin
    assert jetson_gpu("Seeed reComputer J4012", "nvidia,p3767-0000\x00nvidia,tegra234\x00")[0] == "jetson-orin"
    xavier = linux(machine="aarch64", model="NVIDIA Jetson AGX Xavier Developer Kit\x00")
    assert names(xavier) == ["cuda-sm70", "cpu-arm64"]


def test_macos_apple_silicon():
    host = mac("arm64", MAC_M2_PRO)
    assert (host.arch, host.system, host.cpu_model) == ("arm64", "darwin", "Apple M2 Pro")
    assert host.memory_total == 32 * GiB and host.memory_available is None
    assert names(host) == ["apple-metal", "cpu-arm64-dotprod", "cpu-arm64"]
    assert memory_budget("apple-metal", host) == 32 * GiB * 2 // 3  # Metal's working set, not all RAM
    assert memory_budget("cpu-arm64", host) == 32 * GiB
    big = mac("arm64", {**MAC_M2_PRO, "hw.memsize": str(192 * GiB)})
    assert memory_budget("apple-metal", big) == 144 * GiB


def test_macos_rosetta_reports_the_hardware():
    # an x86_64 Python under Rosetta 2: hw.optional.arm64 tells the truth
    assert names(mac("x86_64", MAC_M2_PRO)) == ["apple-metal", "cpu-arm64-dotprod", "cpu-arm64"]


def test_macos_intel():
    host = mac("x86_64", MAC_INTEL_I9)
    assert {"avx2", "fma", "abm", "pni", "sse4_2", "lahf_lm"} <= host.cpu_features
    assert names(host) == ["cpu-x86_64-avx2", "cpu-x86_64"] and host.gpus == ()


# ---- choosing an artifact ------------------------------------------------------------------------

PUBLISHED = {
    "cuda-sm90": 16 * GiB,
    "cuda-sm80": 15 * GiB,
    "cuda-sm75": 5 * GiB,
    "cpu-x86_64-avx2": 5 * GiB,
    "cpu-x86_64": 4 * GiB,
    "cpu-arm64": 4 * GiB,
}


def test_choose_prefers_best_gpu_target_that_fits():
    a100s = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_2xA100)
    assert choose_artifact(a100s, PUBLISHED) == "cuda-sm80"
    t4 = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_T4)
    assert choose_artifact(t4, PUBLISHED) == "cuda-sm75"
    # the T4's 15 GiB cannot hold the sm75 build if it is 16 GiB: fall back to the CPU build
    assert choose_artifact(t4, {**PUBLISHED, "cuda-sm75": 16 * GiB}) == "cpu-x86_64-avx2"


def test_choose_walks_down_to_smaller_artifacts_and_cpu():
    small_gpu = Host(arch="x86_64", cpu_features=get_target("cpu-x86_64-avx2").cpu_features,
                     gpus=[Gpu(compute_capability=(8, 6), memory=12 * GiB)], memory_available=4 * GiB + 1)
    # sm86 bf16 build too big for a 12 GiB RTX 3060; the older int4 build fits
    assert choose_artifact(small_gpu, {"cuda-sm86": 14 * GiB, "cuda-sm75": 5 * GiB}) == "cuda-sm75"
    # no GPU build fits; avx2 build does not fit host memory either, baseline does
    assert choose_artifact(small_gpu, {"cuda-sm86": 14 * GiB, "cpu-x86_64-avx2": 5 * GiB,
                                       "cpu-x86_64": 4 * GiB}) == "cpu-x86_64"


def test_mixed_gpus_budget_counts_only_capable_gpus():
    host = linux(nvidia_smi="7.5, 15360 MiB, Tesla T4\n8.0, 40960 MiB, NVIDIA A100-PCIE-40GB\n")
    assert memory_budget("cuda-sm80", host) == 40 * GiB
    assert memory_budget("cuda-sm75", host) == 55 * GiB
    assert choose_artifact(host, {"cuda-sm80": 45 * GiB, "cuda-sm75": 45 * GiB}) == "cuda-sm75"


def test_max_memory_overrides_the_detected_budget():
    host = linux(cpuinfo=XEON_AVX512, nvidia_smi=SMI_2xA100)
    assert choose_artifact(host, PUBLISHED, max_memory=10 * GiB) == "cuda-sm75"
    assert choose_artifact(host, PUBLISHED, max_memory=4 * GiB) == "cpu-x86_64"
    with pytest.raises(UsageError, match="max memory"):
        choose_artifact(host, PUBLISHED, max_memory=0)


def test_available_values_may_be_manifests_or_unknown():
    host = Host(arch="x86_64", memory_available=8 * GiB)
    manifest = SimpleNamespace(size=2 * GiB, digest="sha256:00")
    assert choose_artifact(host, {"cpu-x86_64": manifest}) == "cpu-x86_64"
    assert choose_artifact(host, {"cpu-x86_64": {"size": 2 * GiB, "format": "gguf"}}) == "cpu-x86_64"
    assert choose_artifact(host, {"cpu-x86_64": None}) == "cpu-x86_64"
    np = pytest.importorskip("numpy")
    assert rank_artifacts(host, {"cpu-x86_64": np.int64(3 * GiB)})[0].size == 3 * GiB
    assert choose_artifact(host, {"tpu-v5e": 1, "cpu-x86_64": 1}) == "cpu-x86_64"  # unknown names ignored
    with pytest.raises(UsageError, match="cpu-x86_64.*size"):
        choose_artifact(host, {"cpu-x86_64": "big"})


def test_rank_artifacts_explains_each_artifact():
    host = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_T4, meminfo=MEMINFO_4G)
    verdicts = rank_artifacts(host, {"cpu-arm64": 1, "cpu-x86_64": 8 * GiB, "cuda-sm75": GiB, "cuda-sm90": 1})
    assert [(c.target, c.rank, c.fits) for c in verdicts] == [
        ("cuda-sm75", 0, True), ("cpu-x86_64", 3, False), ("cpu-arm64", None, False), ("cuda-sm90", None, False)]
    assert "exceeds host memory (3.0 GiB)" in verdicts[1].reason
    assert verdicts[2].reason == "needs an arm64 CPU"
    assert verdicts[3].reason == "needs a CUDA GPU of compute capability >= 9.0"


def test_error_when_nothing_fits():
    host = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_T4, meminfo=MEMINFO_4G)
    available = {"cuda-sm90": 8 * GiB, "cuda-sm75": 20 * GiB, "cpu-x86_64-avx2": 6 * GiB, "cpu-arm64-dotprod": GiB}
    with pytest.raises(NoCompatibleTarget) as info:
        choose_artifact(host, available)
    err = info.value
    msg = str(err)
    assert isinstance(err, SlmpkgError) and "\n" not in msg
    assert msg.startswith("no artifact for this host (x86_64 linux, CPU 'Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz' "
                          "(cpu-x86_64-avx2), 1 GPU: Tesla T4 sm_75 15.0 GiB, memory 3.0 GiB available of 3.7 GiB)")
    assert "cuda-sm75 (20.0 GiB): exceeds GPU memory (15.0 GiB)" in msg
    assert "cpu-x86_64-avx2 (6.0 GiB): exceeds host memory (3.0 GiB)" in msg
    assert "cuda-sm90 (8.0 GiB): needs a CUDA GPU of compute capability >= 9.0" in msg
    assert "cpu-arm64-dotprod (1.0 GiB): needs an arm64 CPU" in msg
    assert msg.endswith("this host runs: cuda-sm75, cuda-sm70, cpu-x86_64-avx2, cpu-x86_64")
    assert err.host is host and len(err.candidates) == 4


def test_error_when_nothing_is_published_or_host_runs_nothing():
    with pytest.raises(NoCompatibleTarget, match="no artifacts are published; this host runs: cpu-arm64$"):
        choose_artifact(Host(arch="arm64"), {})
    with pytest.raises(NoCompatibleTarget, match=r"armv7l.*needs an arm64 CPU; this host runs: none$"):
        choose_artifact(Host(arch="armv7l"), {"cpu-arm64": GiB})


# ---- sizes, JSON, the real machine ---------------------------------------------------------------


def test_sizes():
    assert format_size(15360 * MiB) == "15.0 GiB" and format_size(None) == "unknown" and format_size(12) == "12 B"


def test_targets_document_is_json():
    catalog = targets_document()
    assert set(catalog) == {"targets"} and len(catalog["targets"]) == len(TARGETS)
    assert catalog["targets"][2]["compute_capability"] == "9.0"
    host = linux(cpuinfo=XEON_AVX2, nvidia_smi=SMI_T4)
    doc = json.loads(json.dumps(targets_document(host)))
    assert doc["compatible"] == ["cuda-sm75", "cuda-sm70", "cpu-x86_64-avx2", "cpu-x86_64"]
    assert doc["host"]["gpus"] == [{"kind": "cuda", "name": "Tesla T4", "compute_capability": "7.5",
                                    "memory": 15360 * MiB, "integrated": False}]
    by_name = {t["name"]: t for t in doc["targets"]}
    assert by_name["cuda-sm75"]["rank"] == 0 and by_name["cuda-sm75"]["memory_budget"] == 15360 * MiB
    assert by_name["cuda-sm80"]["compatible"] is False and by_name["cuda-sm80"]["rank"] is None


def test_docstring_examples():
    import doctest

    import slmpkg.targets

    result = doctest.testmod(slmpkg.targets)
    assert result.attempted >= 10 and result.failed == 0


def test_detect_host_on_this_machine():
    host = detect_host()
    expected = {"amd64": "x86_64", "x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
    machine = platform.machine().lower()
    assert host.arch == expected.get(machine, machine) or (host.system == "darwin" and host.arch == "arm64")
    assert host.system == platform.system().lower()
    if host.arch in ("x86_64", "arm64"):
        assert compatible_targets(host)[-1].name in ("cpu-x86_64", "cpu-arm64")
    if host.system == "linux":
        assert host.memory_total and host.memory_total > 0 and host.cpu_features
    json.dumps(targets_document(host))
    assert host.describe()
