"""GPU energy readers behind one Protocol (`EnergyReader`): NVML (`conserve.energy.nvml`), dcgm-exporter
scrape (`conserve.energy.dcgm`), null and fake (`conserve.energy.reader`), and a dcgm-exporter look-alike for
fake GPUs (`conserve.gpusim.fakedcgm`, test infrastructure beside gpu-sim). The arithmetic (deltas,
attribution) is in `conserve.core.energy`."""

from conserve.energy.reader import EnergyReader, FakeReader, GpuReading, NullReader, PodRef, merge_readings

__all__ = ["EnergyReader", "FakeReader", "GpuReading", "NullReader", "PodRef", "merge_readings"]
