"""Precision "auto": bf16 only where the device runs bf16 matmuls fast, fp32 elsewhere; a forced
bf16 on a CPU that emulates it warns once, with the measured slowdown. (conftest.py gives every
test a CPU without fast bf16; the tests here set the CPU they need.)"""

import warnings
from pathlib import Path

import pytest
import torch

from axial_transformer import precision
from axial_transformer.precision import choose_precision, cpu_bf16_flags, cpu_bf16_speedup
from axial_transformer.training.config import OptimConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def cpu(monkeypatch, speedup: float, flags: tuple[str, ...] = ()) -> None:
    """A CPU whose bf16 check measures `speedup` and which reports `flags`."""
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: list(flags))
    precision.warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize("speedup, bf16, says", [
    (2.0, True, "ran 2.0x faster"),
    (1.1, False, "only 1.10x faster"),  # within a busy machine's noise: fp32
    (0.25, False, "ran 4.0x slower"),
])
def test_auto_follows_the_measured_cpu_speed(monkeypatch, speedup, bf16, says):
    cpu(monkeypatch, speedup)
    chosen = choose_precision("auto", "cpu")
    assert chosen.bf16 is bf16 and says in chosen.reason
    assert str(chosen).startswith("bf16 (auto: " if bf16 else "fp32 (auto: ")


def test_auto_takes_bf16_on_a_cpu_that_reports_it_without_timing(monkeypatch):
    cpu(monkeypatch, 0.25, flags=("amx_bf16",))
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: pytest.fail("timed"))
    chosen = choose_precision("auto", torch.device("cpu"))
    assert chosen.bf16 and "amx_bf16" in chosen.reason


@pytest.mark.parametrize("flags, speedup", [(("avx512_bf16",), 0.25), ((), 2.0)])
def test_auto_keeps_a_narrow_model_in_fp32_on_a_fast_cpu(monkeypatch, flags, speedup):
    cpu(monkeypatch, speedup, flags)
    narrow = choose_precision("auto", "cpu", precision.CPU_BF16_MIN_WIDTH - 1)
    assert not narrow.bf16 and f"width {precision.CPU_BF16_MIN_WIDTH - 1}" in narrow.reason
    # The negative control: at the threshold, or with no width given, the CPU decides.
    assert choose_precision("auto", "cpu", precision.CPU_BF16_MIN_WIDTH).bf16
    assert choose_precision("auto", "cpu").bf16
    # A forced bf16 is taken at any width.
    assert choose_precision("bf16", "cpu", 32).bf16


def test_the_width_rule_is_for_cpus_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_precision("auto", "cuda", 32).bf16


def test_auto_on_cuda_asks_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert choose_precision("auto", "cuda").bf16 is supported


@pytest.mark.parametrize("speedup", [0.25, 2.0])
def test_bf16_and_no_force_a_precision(monkeypatch, speedup):
    cpu(monkeypatch, speedup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert choose_precision("bf16", "cpu").bf16
    assert not choose_precision("no", "cpu").bf16
    with pytest.raises(ValueError, match="precision must be 'auto', 'bf16' or 'no'"):
        choose_precision("fp16", "cpu")


def test_forced_bf16_on_an_emulating_cpu_warns_once_with_the_slowdown(monkeypatch):
    cpu(monkeypatch, 0.25)
    with pytest.warns(UserWarning, match=r"bf16 matmuls ran 4\.0x slower than fp32"):
        choose_precision("bf16", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_precision("bf16", "cpu")  # the second time: no warning


@pytest.mark.parametrize("speedup, flags", [(2.0, ()), (0.25, ("avx512_bf16",))])
def test_forced_bf16_on_a_fast_cpu_does_not_warn(monkeypatch, speedup, flags):
    """The negative control of the warning: a CPU that runs bf16 fast gets none."""
    cpu(monkeypatch, speedup, flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision("bf16", "cpu").bf16


@pytest.mark.parametrize("flags, found", [
    ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", ["avx512_bf16", "amx_bf16"]),
    ("fpu avx2 avx512f avx512_vnni amx_tile", []),  # AMX without its bf16 unit, no AVX512-BF16
])
def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path, flags, found):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_bf16_flags(info) == found
    assert cpu_bf16_flags(tmp_path / "missing") == []


def test_a_capability_naming_bf16_counts(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert cpu_bf16_flags(tmp_path / "missing") == ["AVX512_BF16"]


def test_the_cpu_check_runs_once_per_process():
    ratio = cpu_bf16_speedup()  # conftest's stand-in is on the module; this is the real one
    assert 0 < ratio < float("inf")
    assert cpu_bf16_speedup() == ratio and cpu_bf16_speedup.cache_info().hits >= 1


def test_auto_is_the_default_everywhere():
    assert OptimConfig().mixed_precision == "auto"
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert load_config(path).train.mixed_precision == "auto", path.name
