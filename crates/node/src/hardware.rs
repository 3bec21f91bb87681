//! What this machine has: CPU, memory, GPUs, OS (for `/api/admin/stats`).

use serde::Serialize;

use crate::infer::{DeviceInfo, backend_devices};

/// A snapshot of the machine.
#[derive(Debug, Clone, Serialize)]
pub struct HardwareInfo {
    /// CPU model name.
    pub cpu_model: String,
    /// Physical cores, when known.
    pub cpu_cores: Option<usize>,
    /// Logical cores.
    pub cpu_threads: usize,
    /// Current CPU use over all cores, percent.
    pub cpu_percent: f64,
    /// Total RAM in bytes.
    pub ram_total: u64,
    /// Used RAM in bytes.
    pub ram_used: u64,
    /// GPUs and other accelerators llama.cpp can use (empty on CPU-only machines).
    pub gpus: Vec<DeviceInfo>,
    /// OS name and version.
    pub os: String,
    /// Kernel version.
    pub kernel: String,
    /// Machine architecture.
    pub arch: String,
    /// Seconds since the machine booted.
    pub system_uptime_seconds: u64,
}

/// Takes a snapshot (blocking for ~200 ms to measure CPU use).
pub fn snapshot() -> HardwareInfo {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    let mut sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::everything())
            .with_memory(MemoryRefreshKind::everything()),
    );
    std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
    sys.refresh_cpu_usage();
    let cpu_model = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    HardwareInfo {
        cpu_model,
        cpu_cores: System::physical_core_count(),
        cpu_threads: sys.cpus().len(),
        cpu_percent: (sys.global_cpu_usage() as f64 * 10.0).round() / 10.0,
        ram_total: sys.total_memory(),
        ram_used: sys.used_memory(),
        gpus: backend_devices()
            .into_iter()
            .filter(|d| d.kind != "cpu")
            .collect(),
        os: System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string()),
        kernel: System::kernel_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        system_uptime_seconds: System::uptime(),
    }
}

/// Total RAM of this machine in GiB.
pub fn total_memory_gb() -> f64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.total_memory() as f64 / (1u64 << 30) as f64
}

/// RAM available for new allocations now, in bytes (what a newly loaded layer
/// range could take).
pub fn available_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}
