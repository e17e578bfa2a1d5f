//! Measurements for benchmark reports: latency percentiles from raw samples,
//! a process's CPU time and resident memory read from `/proc`, and a
//! description of the machine the numbers were taken on.

use std::fmt;
use std::path::Path;
use std::time::Duration;

/// Raw latency samples in microseconds. Sorting the samples once is exact and
/// cheap at benchmark sizes (millions of samples at most), so no histogram
/// crate is needed.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    micros: Vec<u64>,
}

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    pub count: usize,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub(crate) mean_us: f64,
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        self.micros
            .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    /// Nearest-rank percentiles.
    pub fn summary(&self) -> LatencySummary {
        if self.micros.is_empty() {
            return LatencySummary::default();
        }
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        let rank = |fraction: f64| {
            let index = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[index - 1]
        };
        LatencySummary {
            count: sorted.len(),
            p50_us: rank(0.50),
            p90_us: rank(0.90),
            p99_us: rank(0.99),
            p999_us: rank(0.999),
            max_us: sorted[sorted.len() - 1],
            mean_us: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64,
        }
    }
}

/// Milliseconds with three decimals, the unit of every latency column.
pub fn format_ms(micros: u64) -> String {
    format!("{:.3}", micros as f64 / 1000.0)
}

/// A process's cumulative CPU time and memory at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessSample {
    /// User plus system time of all threads, dead ones included.
    pub cpu: Duration,
    pub resident_kib: u64,
    /// The resident set's high-water mark.
    pub peak_resident_kib: u64,
}

/// Linux reports process times in clock ticks of `USER_HZ`, which is 100 on
/// every architecture Rust targets (`getconf CLK_TCK`); reading it through
/// libc would need `unsafe`, which the crate forbids.
const CLOCK_TICKS_PER_SECOND: u64 = 100;

impl ProcessSample {
    /// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
    pub fn read(pid: u32) -> std::io::Result<Self> {
        Self::read_from(&Path::new("/proc").join(pid.to_string()))
    }

    /// The calling process (an in-process daemon shares it with the load).
    pub(crate) fn read_own() -> std::io::Result<Self> {
        Self::read_from(Path::new("/proc/self"))
    }

    fn read_from(directory: &Path) -> std::io::Result<Self> {
        let stat = std::fs::read_to_string(directory.join("stat"))?;
        let status = std::fs::read_to_string(directory.join("status"))?;
        let ticks = parse_cpu_ticks(&stat).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected /proc stat")
        })?;
        Ok(Self {
            cpu: Duration::from_millis(ticks * 1000 / CLOCK_TICKS_PER_SECOND),
            resident_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            peak_resident_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        })
    }
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`. The command name
/// (field 2) may hold spaces, so fields are counted after its closing paren.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state), so field n is fields[n - 3].
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the numbers were measured on, printed with every report.
#[derive(Debug, Clone)]
pub struct Machine {
    pub(crate) cores: usize,
    pub(crate) cpu_model: String,
    pub(crate) memory_total: String,
    pub(crate) load_average: String,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map_or_else(
                || "unknown".to_owned(),
                |(_, model)| model.trim().to_owned(),
            );
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_total = status_kib(&meminfo, "MemTotal:").map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0),
        );
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            memory_total,
            load_average: load_average(),
        }
    }
}

/// The 1-, 5- and 15-minute load averages, as `uptime` shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

impl fmt::Display for Machine {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} cores ({}), {} RAM, load average {}",
            self.cores, self.cpu_model, self.memory_total, self.load_average
        )
    }
}

/// A plain-text table with aligned columns, printed by every scenario.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|cell| (*cell).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.header.len();
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .filter_map(|row| row.get(column))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |formatter: &mut fmt::Formatter<'_>, cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            writeln!(formatter, "| {} |", padded.join(" | "))
        };
        line(formatter, &self.header)?;
        let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
        writeln!(formatter, "|-{}-|", rule.join("-|-"))?;
        for row in &self.rows {
            line(formatter, row)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut latencies = Latencies::default();
        for micros in 1..=1000 {
            latencies.record(Duration::from_micros(micros));
        }
        let summary = latencies.summary();
        assert_eq!(
            (
                summary.p50_us,
                summary.p99_us,
                summary.p999_us,
                summary.max_us
            ),
            (500, 990, 999, 1000)
        );
    }

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces() {
        let stat = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn the_own_process_can_be_sampled() {
        let sample = ProcessSample::read_own().unwrap();
        assert!(sample.resident_kib > 0);
    }
}
