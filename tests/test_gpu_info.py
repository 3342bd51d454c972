"""-lg N: GPU information through NVML (a fake NVML library here; the real one in
benchmarks/hellaswag_check.py on a GPU), and training on a host that cannot report it."""

import ctypes
import importlib

import numpy as np
import pytest

from nanollm.data import write_shard
from nanollm.gpu_info import GpuMonitor, format_line, throttle_reason

NOT_SUPPORTED = 3


class FakeNvml:
    """NVML's C entry points as ctypes calls them: a status code, outputs through byref pointers."""

    def __init__(self, missing=(), unsupported=()):
        self.missing, self.unsupported = set(missing), set(unsupported)
        self.bus_id = None
        values = {
            "nvmlDeviceGetFanSpeed": 40, "nvmlDeviceGetClockInfo": 1755, "nvmlDeviceGetMaxClockInfo": 1980,
            "nvmlDeviceGetPowerUsage": 612_345, "nvmlDeviceGetPowerManagementLimit": 700_000,
            "nvmlDeviceGetTemperature": 51, "nvmlDeviceGetTemperatureThreshold": 87,
            "nvmlDeviceGetCurrentClocksEventReasons": 0x4,
        }
        for name, value in values.items():
            setattr(self, name, self._scalar(name, value))

    def __getattr__(self, name):  # only reached for names not set: an entry point this driver lacks
        raise AttributeError(name)

    def _scalar(self, name, value):
        def call(handle, *args):
            if name in self.unsupported:
                return NOT_SUPPORTED
            args[-1]._obj.value = value
            return 0
        return call

    def nvmlInit_v2(self):
        return 0

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id, handle):
        self.bus_id = bus_id
        handle._obj.value = 1234
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle._obj.value = 1000 + index
        return 0

    def nvmlDeviceGetUtilizationRates(self, handle, out):
        out._obj.gpu, out._obj.memory = 97, 58
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle, out):
        out._obj.total, out._obj.used, out._obj.free = 140 * 2**30, 35 * 2**30, 105 * 2**30
        return 0


def test_monitor_reads_every_field_through_nvml():
    nvml = FakeNvml()
    monitor = GpuMonitor("0000:18:00.0", nvml=nvml)
    assert monitor.error is None and nvml.bus_id == b"0000:18:00.0"
    info = monitor.query()
    assert info == {"gpu_utilization": 97, "mem_utilization": 58, "memory_used": 35 * 2**30,
                    "memory_total": 140 * 2**30, "fan": 40, "clock": 1755, "max_clock": 1980, "power": 612_345,
                    "power_limit": 700_000, "temperature": 51, "temp_slowdown": 87, "throttle": "power cap"}
    assert monitor.line() == ("                  compute 97.0% | memory: 58.0% | 35.0 / 140.0 GiB | fan: 40% "
                              "| 1755 MHz / 1980 MHz | 612 W / 700 W | 51°C / 87°C | power cap")


def test_fields_a_gpu_does_not_report_print_na():
    nvml = FakeNvml(unsupported={"nvmlDeviceGetFanSpeed"})
    del nvml.nvmlDeviceGetCurrentClocksEventReasons  # a driver without it (nor the older name)
    monitor = GpuMonitor(None, nvml=nvml)  # no PCI address: NVML's device 0, as llm.c
    assert monitor.error is None and monitor.handle.value == 1000
    info = monitor.query()
    assert info["fan"] is None and info["throttle"] is None and info["clock"] == 1755
    assert "| fan: n/a | 1755 MHz /" in monitor.line() and monitor.line().endswith("| n/a")


def test_no_nvml_is_an_error_string_not_an_exception():
    class Failing:
        def nvmlInit_v2(self):
            return 9  # NVML_ERROR_DRIVER_NOT_LOADED

    monitor = GpuMonitor(nvml=Failing())
    assert "nvmlInit_v2 failed: NVML error 9" in monitor.error
    assert monitor.query() == {}
    assert format_line({}).count("n/a") == 12


def test_throttle_reasons_as_llmc_groups_them():
    assert [throttle_reason(b) for b in (0, 0x4, 0x80, 0x20, 0x40, 0x1, 0x2, 0x24)] == \
        ["no cap", "power cap", "power cap", "thermal cap", "thermal cap", "other cap", "other cap", "power cap"]


def test_lg_on_a_host_without_gpu_information_says_so_once(tmp_path, capsys):
    train = importlib.import_module("nanollm.train")
    write_shard(tmp_path / "t_train_000000.bin", np.arange(400, dtype=np.uint16) % 300)
    result = train.train(input_bin=str(tmp_path / "t_train_*.bin"), model="d1", batch_size=1, seq_len=8, max_steps=2,
                         val_loss_every=0, sample_every=0, device="cpu", log_gpu_every=1)
    assert result.steps == 2
    out = capsys.readouterr().out
    assert out.count("-lg 1: no GPU information (training on the CPU); training goes on without it") == 1
    assert "compute" not in out


def test_ctypes_byref_outputs_are_what_the_fake_writes():
    """The fake's `_obj` writes are what ctypes hands the C function: a guard on the fake itself."""
    out = ctypes.c_uint()
    FakeNvml().nvmlDeviceGetTemperature(None, 0, ctypes.byref(out))
    assert out.value == 51


@pytest.mark.parametrize("flag, value, message", [
    ("log_gpu_every", -2, "-lg must be -1 (off), 0 (off) or a positive step count"),
])
def test_lg_bad_values(flag, value, message):
    from nanollm.train_config import TrainConfig, UsageError, validate

    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(TrainConfig(**{flag: value}))
