//! Driving one process over its stdio, line by line, the way an MCP host does.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How to start one of the ways under test.
#[derive(Clone, Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set in the child's environment.
    pub env: Vec<(String, String)>,
    /// Where the child's stderr goes (appended).
    pub stderr: PathBuf,
}

/// Variables that would change what the proxy does, removed from every child's environment;
/// a way that wants one sets it in [`Launch::env`].
const SCRUBBED: [&str; 5] = [
    "APIE_API_KEY",
    "APIE_MCP_CONFIG",
    "APIE_RUN_ID",
    "RUST_LOG",
    "APIE_MCP_STATE_DIR",
];

pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    pub line: Vec<u8>,
    pub pid: u32,
    stderr: PathBuf,
    /// A reusable buffer for building requests.
    req: Vec<u8>,
}

impl Proc {
    pub fn spawn(launch: &Launch) -> Proc {
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&launch.stderr)
            .expect("open the stderr log");
        let mut cmd = Command::new(&launch.program);
        cmd.args(&launch.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for var in SCRUBBED {
            cmd.env_remove(var);
        }
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", launch.program.display()));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        Proc {
            pid: child.id(),
            child,
            stdin: Some(stdin),
            out: BufReader::with_capacity(256 * 1024, stdout),
            line: Vec::with_capacity(64 * 1024),
            stderr: launch.stderr.clone(),
            req: Vec::with_capacity(1024),
        }
    }

    /// Writes one whole message (which ends in `\n`) with one write.
    pub fn send(&mut self, msg: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        if let Err(e) = stdin.write_all(msg) {
            self.die(&format!("write failed: {e}"));
        }
    }

    /// Reads the next line into [`Proc::line`] (without its `\n`).
    pub fn recv(&mut self) -> &[u8] {
        self.line.clear();
        match self.out.read_until(b'\n', &mut self.line) {
            Ok(0) => self.die("stdout ended"),
            Ok(_) => {
                if self.line.last() == Some(&b'\n') {
                    self.line.pop();
                }
                &self.line
            }
            Err(e) => self.die(&format!("read failed: {e}")),
        }
    }

    fn die(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        let mut log = String::new();
        if let Ok(mut f) = File::open(&self.stderr) {
            let _ = f.read_to_string(&mut log);
        }
        let tail: String = log
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!(
            "process {} ({}): {what}; last stderr lines:\n{tail}",
            self.pid,
            self.stderr.display()
        );
    }

    /// Sends a request and returns its answer, checked to be a result.
    pub fn request(&mut self, msg: &[u8]) -> &[u8] {
        self.send(msg);
        self.recv();
        let line = &self.line;
        if !contains(line, b"\"result\"") || contains(line, b"\"isError\":true") {
            let what = format!(
                "unexpected answer to {}: {}",
                String::from_utf8_lossy(msg).trim_end(),
                String::from_utf8_lossy(&line[..line.len().min(500)])
            );
            self.die(&what);
        }
        &self.line
    }

    /// `initialize`, `notifications/initialized`, `tools/list`: what a host does first.
    pub fn handshake(&mut self) {
        self.request(INITIALIZE);
        self.send(INITIALIZED);
        self.request(b"{\"jsonrpc\":\"2.0\",\"id\":\"list\",\"method\":\"tools/list\"}\n");
    }

    /// One checked `echo` round trip.
    pub fn echo(&mut self, id: u64) {
        let mut req = std::mem::take(&mut self.req);
        echo_call(&mut req, id);
        self.request(&req);
        self.req = req;
    }

    /// The process's peak resident set (`VmHWM`), in bytes, while it is alive.
    pub fn peak_rss(&self) -> Option<u64> {
        peak_rss(self.pid)
    }

    /// CPU time and context switches of all the process's threads so far.
    pub fn usage(&self) -> Usage {
        usage(self.pid)
    }

    /// Separates the writing half, for pipelined runs.
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("stdin is open")
    }

    pub fn give_stdin(&mut self, stdin: ChildStdin) {
        self.stdin = Some(stdin);
    }

    /// Closes stdin (the MCP way to end a session) and waits for the exit; kills after 10 s.
    pub fn finish(mut self) -> Option<ExitStatus> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }
}

pub const INITIALIZE: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"clientInfo\":{\"name\":\"apie-bench\",\"version\":\"0\"}}}\n";
const INITIALIZED: &[u8] = b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n";

/// A `tools/call` of `echo` with a few realistic arguments, as one line.
pub fn echo_call(buf: &mut Vec<u8>, id: u64) {
    buf.clear();
    let _ = writeln!(
        buf,
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"echo\",\
         \"arguments\":{{\"path\":\"/srv/data/reports/2026/q3/summary-{id}.csv\",\"limit\":100,\
         \"message\":\"hello from the benchmark\",\"tags\":[\"bench\",\"echo\"],\"n\":{id}}}}}}}"
    );
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// `VmHWM` of a live process, in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a process has used so far, summed over its live threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// On-CPU time, ns (`/proc/<pid>/task/*/schedstat`, its first field).
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU, ns (`schedstat`'s second field): on a machine with
    /// fewer CPUs than busy threads, what the threads lose to one another.
    pub wait_ns: u64,
    /// Voluntary and involuntary context switches.
    pub switches: u64,
}

impl Usage {
    pub fn since(self, before: Usage) -> Usage {
        Usage {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

impl std::iter::Sum for Usage {
    fn sum<I: Iterator<Item = Usage>>(all: I) -> Usage {
        all.fold(Usage::default(), |a, b| Usage {
            cpu_ns: a.cpu_ns + b.cpu_ns,
            wait_ns: a.wait_ns + b.wait_ns,
            switches: a.switches + b.switches,
        })
    }
}

pub fn usage(pid: u32) -> Usage {
    let mut u = Usage::default();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return u;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        if let Ok(stat) = std::fs::read_to_string(dir.join("schedstat")) {
            let mut fields = stat
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            u.cpu_ns += fields.next().unwrap_or(0);
            u.wait_ns += fields.next().unwrap_or(0);
        }
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for line in status.lines() {
                if line.starts_with("voluntary_ctxt_switches")
                    || line.starts_with("nonvoluntary_ctxt_switches")
                {
                    u.switches += line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    u
}

/// `pid` and every live process below it (`/proc/<pid>/task/*/children`).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while let Some(&p) = all.get(next) {
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                all.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    all
}

/// What the processes have used so far, together.
pub fn usage_of(pids: &[u32]) -> Usage {
    pids.iter().map(|&p| usage(p)).sum()
}
