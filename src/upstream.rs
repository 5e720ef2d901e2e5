//! The upstream MCP server as a child process.
//!
//! It is spawned in a process group of its own (so `npx`, `uvx` or a shell wrapper and whatever
//! they start can be signalled together), with stdin and stdout piped to the relay and stderr
//! inherited (drained to the proxy's own stderr by the kernel, so it can never fill up and stall
//! the server). [`Upstream::stop`] is the one teardown path: wait for the server to leave by
//! itself, then SIGTERM the group, then SIGKILL it; it also sweeps up group members left behind
//! by a server that exited on its own. `kill_on_drop` is the last line of defence.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::framing::Outlet;
use crate::stdio::{self, Input};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    pub command: String,
    pub args: Vec<String>,
    /// Added to the proxy's own environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start upstream {command:?}: {source}")]
pub struct SpawnError {
    pub command: String,
    #[source]
    pub source: std::io::Error,
}

impl SpawnError {
    /// The shell's convention: 127 for a command not found, 126 for one that cannot run.
    pub fn exit_code(&self) -> u8 {
        if self.source.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    }
}

pub struct Upstream {
    child: Child,
    pgid: Pid,
}

/// How long each step of the shutdown cascade waits (SPEC §7).
pub const GRACE: Duration = Duration::from_secs(2);

impl Upstream {
    /// Starts the server; also returns its stdin (non-blocking, so the runtime's tasks may try
    /// writes themselves) and its stdout (blocking, for the reader thread).
    pub fn spawn(spec: &UpstreamSpec) -> Result<(Upstream, Outlet, Input), SpawnError> {
        let mut cmd = Command::new(&spec.command);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let err = |source| SpawnError {
            command: spec.command.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(err)?;
        let pid = child
            .id()
            .ok_or_else(|| err(std::io::Error::other("exited at once")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| err(std::io::Error::other("no stdin")))?
            .into_owned_fd()
            .map_err(err)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| err(std::io::Error::other("no stdout")))?
            .into_owned_fd()
            .map_err(err)?;
        // tokio hands both back blocking; its stdin is wanted non-blocking.
        stdio::set_nonblocking(stdin.as_fd(), true).map_err(err)?;
        let pgid = Pid::from_raw(pid as i32);
        let stdin = Outlet::new("the server's stdin", Some(stdin.into()), true);
        Ok((Upstream { child, pgid }, stdin, Input::new(stdout)))
    }

    /// The process id (and process-group id) of the server.
    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    /// Waits for the server to exit by itself.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Stops the server and everything in its process group: waits `grace` for it to exit (its
    /// stdin should already be closed), then SIGTERM to the group, `grace` again, then SIGKILL.
    /// Group members still alive after the server itself exited get the same treatment.
    pub async fn stop(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                tracing::info!(pid = self.pid(), "upstream still running: SIGTERM");
                self.signal(Signal::SIGTERM);
                match tokio::time::timeout(grace, self.child.wait()).await {
                    Ok(status) => status?,
                    Err(_) => {
                        tracing::warn!(pid = self.pid(), "upstream ignored SIGTERM: SIGKILL");
                        self.signal(Signal::SIGKILL);
                        self.child.wait().await?
                    }
                }
            }
        };
        self.sweep_group(grace).await;
        Ok(status)
    }

    /// Ends what is left of the process group once the server itself has exited.
    async fn sweep_group(&self, grace: Duration) {
        if !self.group_alive() {
            return;
        }
        tracing::info!(pgid = self.pid(), "upstream left processes behind: SIGTERM");
        self.signal(Signal::SIGTERM);
        if self.group_gone_within(grace).await {
            return;
        }
        tracing::warn!(pgid = self.pid(), "processes ignored SIGTERM: SIGKILL");
        self.signal(Signal::SIGKILL);
        self.group_gone_within(grace).await;
    }

    fn signal(&self, sig: Signal) {
        // ESRCH (nothing left in the group) is the outcome we want anyway.
        let _ = killpg(self.pgid, sig);
    }

    /// True while a process of the group is running. A zombie does not count: once killed, a
    /// grandchild waits to be reaped by init (which in some containers never comes).
    fn group_alive(&self) -> bool {
        if killpg(self.pgid, None).is_err() {
            return false;
        }
        live_members(self.pgid.as_raw()).unwrap_or(true)
    }

    async fn group_gone_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if !self.group_alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !self.group_alive()
    }
}

/// Whether `/proc` shows a live (not zombie) process in group `pgid`; `None` without `/proc`.
fn live_members(pgid: i32) -> Option<bool> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(pgid) && !matches!(state, Some("Z" | "X")) {
            return Some(true);
        }
    }
    Some(false)
}

/// The exit code a status stands for: the code, or 128 + the signal that ended the process.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => 1,
    }
}
