"""GPU state for -lg N: llm.c's get_gpu_utilization_info (llmc/mfu.h), through NVML.

NVML is the driver's libnvidia-ml, loaded with ctypes, so no Python package is needed. Every field
is queried on its own: one the GPU or driver does not report (a fan on an SXM card, say) prints as
n/a. Where NVML cannot be loaded or initialised at all, GpuMonitor.error says why and -lg prints
that once; training goes on. Utilisation is NVML's current rates (llm.c averages the buffered
samples instead); memory is both bandwidth utilisation (llm.c's "memory") and GiB in use.
"""

import ctypes
import ctypes.util

NVML_SUCCESS = 0
NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
# clock-throttle (event) reason bits, as llm.c's get_throttle_reason groups them
POWER_CAP_BITS = 0x4 | 0x80      # SwPowerCap | HwPowerBrakeSlowdown
THERMAL_CAP_BITS = 0x20 | 0x40   # SwThermalSlowdown | HwThermalSlowdown
ALL_REASON_BITS = 0x1FF          # nvmlClocksThrottleReasonAll


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


def load_nvml():
    """The NVML library, or raise OSError."""
    for name in ("libnvidia-ml.so.1", ctypes.util.find_library("nvidia-ml"), "nvml.dll"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise OSError("the NVIDIA driver's NVML library (libnvidia-ml.so.1) was not found")


def throttle_reason(bits):
    if bits & POWER_CAP_BITS:
        return "power cap"
    if bits & THERMAL_CAP_BITS:
        return "thermal cap"
    if bits & ALL_REASON_BITS:
        return "other cap"
    return "no cap"


class GpuMonitor:
    """GPU state from NVML. pci_bus_id ("0000:18:00.0") picks the GPU (the CUDA device training
    runs on); None takes NVML's device 0, as llm.c. nvml: a loaded library (tests pass a fake)."""

    def __init__(self, pci_bus_id=None, nvml=None):
        self.error = None
        self.nvml = nvml
        self.handle = ctypes.c_void_p()
        try:
            if self.nvml is None:
                self.nvml = load_nvml()
            self._check(self.nvml.nvmlInit_v2(), "nvmlInit_v2")
            if pci_bus_id:
                self._check(self.nvml.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(self.handle)),
                            f"nvmlDeviceGetHandleByPciBusId_v2({pci_bus_id})")
            else:
                self._check(self.nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)),
                            "nvmlDeviceGetHandleByIndex_v2(0)")
        except (OSError, AttributeError) as error:
            self.error = str(error)

    def _check(self, status, what):
        if status != NVML_SUCCESS:
            raise OSError(f"{what} failed: NVML error {status}")

    def _get(self, function, *args, ctype=ctypes.c_uint):
        """One query's output value, or None when this GPU or driver does not report it."""
        out = ctype()
        try:
            status = getattr(self.nvml, function)(self.handle, *args, ctypes.byref(out))
        except AttributeError:  # an older driver without this entry point
            return None
        return out if status == NVML_SUCCESS else None

    def query(self):
        """Field -> value (None where not reported); {} when NVML is unavailable."""
        if self.error:
            return {}

        def value(function, *args):
            out = self._get(function, *args)
            return None if out is None else out.value

        util = self._get("nvmlDeviceGetUtilizationRates", ctype=_Utilization)
        memory = self._get("nvmlDeviceGetMemoryInfo", ctype=_Memory)
        reasons = self._get("nvmlDeviceGetCurrentClocksEventReasons", ctype=ctypes.c_ulonglong)
        if reasons is None:  # its older name
            reasons = self._get("nvmlDeviceGetCurrentClocksThrottleReasons", ctype=ctypes.c_ulonglong)
        return {
            "gpu_utilization": None if util is None else util.gpu,
            "mem_utilization": None if util is None else util.memory,
            "memory_used": None if memory is None else memory.used,
            "memory_total": None if memory is None else memory.total,
            "fan": value("nvmlDeviceGetFanSpeed"),
            "clock": value("nvmlDeviceGetClockInfo", NVML_CLOCK_SM),
            "max_clock": value("nvmlDeviceGetMaxClockInfo", NVML_CLOCK_SM),
            "power": value("nvmlDeviceGetPowerUsage"),
            "power_limit": value("nvmlDeviceGetPowerManagementLimit"),
            "temperature": value("nvmlDeviceGetTemperature", NVML_TEMPERATURE_GPU),
            "temp_slowdown": value("nvmlDeviceGetTemperatureThreshold", NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            "throttle": None if reasons is None else throttle_reason(reasons.value),
        }

    def line(self):
        """llm.c's -lg line (with GiB in use added), n/a for what is not reported."""
        return format_line(self.query())


def format_line(info):
    def field(name, fmt, unit="", scale=None):
        v = info.get(name)
        return "n/a" if v is None else format(v if scale is None else v / scale, fmt) + unit

    return (f"                  compute {field('gpu_utilization', '.1f', '%')} "
            f"| memory: {field('mem_utilization', '.1f', '%')} "
            f"| {field('memory_used', '.1f', scale=2**30)} / {field('memory_total', '.1f', ' GiB', 2**30)} "
            f"| fan: {field('fan', 'd', '%')} | {field('clock', 'd', ' MHz')} / {field('max_clock', 'd', ' MHz')} "
            f"| {field('power', '.0f', ' W', 1000)} / {field('power_limit', '.0f', ' W', 1000)} "
            f"| {field('temperature', 'd', '°C')} / {field('temp_slowdown', 'd', '°C')} | {info.get('throttle') or 'n/a'}")
