"""machine.py: CPU flags from /proc/cpuinfo text, the dtype rule, the machine fingerprint."""
import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.runtime import machine
from ctxdraft.selfdraft.runtime.machine import cpu_flags, cpu_model, machine_fingerprint, native_bf16, resolve_dtype

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx512f avx512_fp16 amx_bf16 amx_tile\n"
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd fphp asimdhp bf16 i8mm sve\nCPU implementer\t: 0x41\n"


def test_cpu_flags_reads_the_x86_flags_and_arm_features_lines():
    assert cpu_flags(EPYC) == {"fpu", "vme", "sse", "sse2", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert {"bf16", "asimdhp"} <= cpu_flags(GRAVITON3)
    assert cpu_flags("") == frozenset()


@pytest.mark.parametrize("cpuinfo, expected", [(EPYC, True), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True), (OLD_XEON, False)])
def test_native_bf16_is_read_from_the_flags(cpuinfo, expected):
    assert native_bf16(cpu_flags(cpuinfo)) is expected


def test_auto_is_bfloat16_with_native_bf16_and_float32_without():
    assert resolve_dtype("auto", flags=cpu_flags(EPYC)) == torch.bfloat16
    assert resolve_dtype("auto", flags=cpu_flags(OLD_XEON)) == torch.float32
    # "avx512_bf16_extra" or "avx512bw" must not count as bf16: whole flags only
    assert resolve_dtype("auto", flags=frozenset({"avx512bw", "avx512_bf16_extra"})) == torch.float32


def test_auto_is_bfloat16_on_cuda_whatever_the_cpu():
    assert resolve_dtype("auto", device="cuda", flags=cpu_flags(OLD_XEON)) == torch.bfloat16


@pytest.mark.parametrize("name, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_explicit_dtypes_are_kept(name, expected):
    assert resolve_dtype(name, flags=cpu_flags(OLD_XEON)) == expected


@pytest.mark.parametrize("name", ["float16", torch.float16])
def test_float16_is_refused_on_a_cpu_without_fp16(name):
    with pytest.raises(CtxdraftError, match="float16 needs a CPU with native fp16"):
        resolve_dtype(name, flags=cpu_flags(EPYC))


def test_float16_is_allowed_where_the_cpu_or_the_device_has_it():
    assert resolve_dtype("float16", flags=cpu_flags(SAPPHIRE_RAPIDS)) == torch.float16
    assert resolve_dtype("float16", flags=cpu_flags(GRAVITON3)) == torch.float16
    assert resolve_dtype("float16", device="cuda", flags=cpu_flags(EPYC)) == torch.float16


@pytest.mark.parametrize("name", ["fp32", "bf16", "", "Float32", None, 32, torch.int8, torch.float64])
def test_unknown_dtypes_are_refused_with_the_choices(name):
    with pytest.raises(CtxdraftError) as err:
        resolve_dtype(name, flags=cpu_flags(SAPPHIRE_RAPIDS))
    message = str(err.value)
    assert "\n" not in message
    assert "auto, bfloat16, float16, float32" in message


def test_flags_default_to_this_machines_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv(machine.DTYPE_ENV, raising=False)  # the test suite pins float32 with it
    fake = tmp_path / "cpuinfo"
    fake.write_text(OLD_XEON)
    monkeypatch.setattr(machine, "CPUINFO", fake)
    assert resolve_dtype("auto") == torch.float32
    fake.write_text(EPYC)
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "absent")
    assert cpu_flags() == frozenset() and resolve_dtype("auto") == torch.float32


def test_cpu_model_names_the_processor():
    assert cpu_model(EPYC) == "AMD EPYC 9B14"
    assert cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_model(GRAVITON3)  # no model name line: falls back to the platform, never empty


def test_machine_fingerprint_is_stable_and_changes_with_what_costs_depend_on(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(EPYC)
    monkeypatch.setattr(machine, "CPUINFO", fake)
    fp = machine_fingerprint(torch.bfloat16, threads=2)
    assert fp == machine_fingerprint(torch.bfloat16, threads=2)
    assert (fp["processor"], fp["threads"], fp["dtype"], fp["torch"]) == ("AMD EPYC 9B14", 2, "bfloat16", torch.__version__)
    assert len(fp["hash"]) == 12
    others = [machine_fingerprint(torch.float32, threads=2), machine_fingerprint(torch.bfloat16, threads=4)]
    fake.write_text(SAPPHIRE_RAPIDS)
    others.append(machine_fingerprint(torch.bfloat16, threads=2))
    assert len({fp["hash"], *(o["hash"] for o in others)}) == 4
    assert machine_fingerprint(torch.float32)["threads"] == torch.get_num_threads()


def test_the_environment_overrides_what_auto_means(monkeypatch):
    monkeypatch.setenv(machine.DTYPE_ENV, "float32")
    assert resolve_dtype("auto") == torch.float32
    monkeypatch.setenv(machine.DTYPE_ENV, "bfloat16")
    assert resolve_dtype("auto") == torch.bfloat16
    assert resolve_dtype("float32") == torch.float32  # an explicit dtype wins
    assert resolve_dtype("auto", flags=cpu_flags(OLD_XEON)) == torch.float32  # given flags: no override
    monkeypatch.setenv(machine.DTYPE_ENV, "fast")
    with pytest.raises(CtxdraftError, match="CTXDRAFT_DTYPE='fast' is not a dtype"):
        resolve_dtype("auto")
