//! What the tool reads from the operating system: a process's RSS, TCP sockets per port and
//! per process (from `/proc/net/tcp`), the fd limit, free ports and a description of the
//! machine for the report.

use std::collections::HashSet;
use std::net::TcpListener;

use anyhow::{Context, Result, bail};

/// Resident set size of `pid` in bytes (`VmRSS` of /proc/<pid>/status).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// Total CPU time (user + system) of `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz.max(1.0))
}

/// Raises the soft (and, as root, the hard) open-file limit to `want`; children inherit it.
pub fn raise_fd_limit(want: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to a rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: valid pointer to a rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    // Not root: take what the hard limit allows.
    let capped = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: valid pointer to a rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
    Ok(lim.rlim_max)
}

/// A port nobody listens on right now (bind port 0, read it, release it).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct TcpEntry {
    /// IPv4 local address as /proc prints it (network byte order read as hex); 0 for IPv6.
    local_ip: u32,
    local_port: u16,
    state: u8,
    inode: u64,
}

const ESTABLISHED: u8 = 0x01;
const LISTEN: u8 = 0x0a;

fn tcp_table() -> Vec<TcpEntry> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let Some((ip, port)) = local.rsplit_once(':').and_then(|(ip, p)| {
                Some((
                    u32::from_str_radix(ip, 16).unwrap_or(0),
                    u16::from_str_radix(p, 16).ok()?,
                ))
            }) else {
                continue;
            };
            let (Ok(state), Ok(inode)) = (u8::from_str_radix(state, 16), inode.parse()) else {
                continue;
            };
            out.push(TcpEntry {
                local_ip: ip,
                local_port: port,
                state,
                inode,
            });
        }
    }
    out
}

/// 127.0.0.1 as /proc/net/tcp prints it.
const LOOPBACK: u32 = 0x0100_007f;

/// Established connections accepted on 127.0.0.1:`port` (the server side): how many clients
/// a server listening there holds. The address matters: a load-generator socket bound to
/// 127.0.0.3 may get the same port number as an ephemeral port.
pub fn accepted_on(port: u16) -> usize {
    tcp_table()
        .iter()
        .filter(|e| e.state == ESTABLISHED && e.local_ip == LOOPBACK && e.local_port == port)
        .count()
}

fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                if let Ok(inode) = n.parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// TCP ports `pid` listens on.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes = socket_inodes(pid);
    let mut ports: Vec<u16> = tcp_table()
        .iter()
        .filter(|e| e.state == LISTEN && inodes.contains(&e.inode))
        .map(|e| e.local_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The pid of the oldest process whose command name is `comm` (e.g. `beam.smp`).
pub fn pid_by_name(comm: &str) -> Option<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(name) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if name.trim() == comm {
                found.push(pid);
            }
        }
    }
    found.into_iter().min()
}

/// One line describing the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// Bytes the broker has received and sent so far on the connections it accepted on `port`
/// (`bytes_received` / `bytes_sent` of each socket's `tcp_info`, read with `ss`): the traffic
/// between the proxy's pool and the broker. None when `ss` is missing or fails. Sockets closed
/// in between drop out of the sum, so this is meant for the pool's long-lived connections.
pub fn broker_traffic(port: u16) -> Option<(u64, u64)> {
    let out = std::process::Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = |key: &str| -> u64 {
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix(key))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    Some((sum("bytes_received:"), sum("bytes_sent:")))
}

/// Lowers the calling thread's scheduling priority (Linux: nice is per thread), so that load
/// it generates yields the CPU to the server under test and to the measuring clients.
pub fn nice_this_thread(nice: i32) {
    // SAFETY: gettid and setpriority have no memory preconditions; a failure only leaves the
    // priority unchanged.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}
