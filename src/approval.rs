//! Human approval (SPEC §6): statuses, and the `local` channel; the question put to a human in
//! the host is in [`prompt`], the sealed 2026-07-28 `requestState` in [`state`]. (The `guard`
//! channel is the service's: [`crate::remote`].)
//!
//! The local channel is a queue of files in the user's state directory
//! (`$APIE_MCP_STATE_DIR`, else `<state dir>/apie-mcp`, under `approvals/`), so any terminal can
//! answer a held call with `apie-mcp approvals approve ID`. Each request is its own file
//! (`<id>.json`) and each answer another (`<id>.answer.json`); both are written to a temporary
//! name and renamed into place, so several proxies and several terminals can share the queue
//! without ever reading half a file. An approval is bound to its call: the request records the
//! tool and the SHA-256 of the arguments, the answer must name the same request, the proxy
//! removes both files once it has read the answer (single use), and a request past its expiry
//! cannot be answered.

pub mod prompt;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How a held call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Approved,
    Rejected,
    Expired,
    Cancelled,
    Timeout,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Approved => "approved",
            Status::Rejected => "rejected",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
            Status::Timeout => "timeout",
        }
    }
}

/// A pending approval, as written to the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub id: String,
    pub tool: String,
    pub server: String,
    pub agent_key: String,
    pub arguments_sha256: String,
    pub rule: Option<String>,
    pub reason: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The proxy holding the call.
    pub pid: u32,
}

/// An answer, as written by `apie-mcp approvals approve|reject`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub id: String,
    pub arguments_sha256: String,
    pub status: Status,
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no state directory: set APIE_MCP_STATE_DIR")]
    NoStateDir,
    #[error("no pending approval {0}")]
    Unknown(String),
    #[error("approval {0} has expired")]
    Expired(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A fresh approval id: `apr_` and 12 hex digits.
pub fn new_id() -> String {
    crate::config::new_run_id().replacen("run_mcp_", "apr_", 1)
}

/// The local approval queue.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

impl Queue {
    /// The queue in `$APIE_MCP_STATE_DIR/approvals`, else `<state dir>/apie-mcp/approvals`.
    pub fn open_default() -> Result<Queue, QueueError> {
        let base = std::env::var_os("APIE_MCP_STATE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                dirs::state_dir()
                    .or_else(dirs::data_local_dir)
                    .map(|d| d.join("apie-mcp"))
            })
            .ok_or(QueueError::NoStateDir)?;
        Ok(Queue::at(base.join("approvals")))
    }

    pub fn at(dir: impl Into<PathBuf>) -> Queue {
        Queue { dir: dir.into() }
    }

    fn request_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn answer_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.answer.json"))
    }

    /// Writes `value` to `path` atomically (temporary file, then rename).
    fn write(&self, path: &Path, value: &impl Serialize) -> Result<(), QueueError> {
        let io = |source| QueueError::Io {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let text = serde_json::to_vec_pretty(value).map_err(|e| io(e.into()))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Puts a request in the queue.
    pub fn submit(&self, request: &Request) -> Result<(), QueueError> {
        self.write(&self.request_path(&request.id), request)
    }

    /// The answer to `request`, if one was given (and it names this very call).
    pub fn answer(&self, request: &Request) -> Option<Answer> {
        let answer: Answer = Self::read(&self.answer_path(&request.id))?;
        (answer.id == request.id && answer.arguments_sha256 == request.arguments_sha256)
            .then_some(answer)
    }

    /// Removes a request and its answer: an approval is used once.
    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.request_path(id));
        let _ = std::fs::remove_file(self.answer_path(id));
    }

    /// Pending requests, oldest first.
    pub fn list(&self) -> Vec<Request> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Request> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && !p.to_string_lossy().ends_with(".answer.json")
            })
            .filter_map(|p| Self::read::<Request>(&p))
            .filter(|r| {
                // A proxy that was killed could not clean up after itself.
                let stale = r.expires_ms <= now_ms() || !process_alive(r.pid);
                if stale {
                    self.remove(&r.id);
                }
                !stale
            })
            .collect();
        out.sort_by_key(|r: &Request| r.created_ms);
        out
    }

    /// Answers a pending request (`approvals approve|reject`).
    pub fn resolve(
        &self,
        id: &str,
        status: Status,
        reason: Option<String>,
    ) -> Result<Request, QueueError> {
        let request: Request = Self::read(&self.request_path(id))
            .ok_or_else(|| QueueError::Unknown(id.to_string()))?;
        if request.expires_ms <= now_ms() {
            return Err(QueueError::Expired(id.to_string()));
        }
        let answer = Answer {
            id: request.id.clone(),
            arguments_sha256: request.arguments_sha256.clone(),
            status,
            reason,
        };
        self.write(&self.answer_path(id), &answer)?;
        Ok(request)
    }
}

/// `apie-mcp approvals …`. Returns the exit code: 0, or 1 when the id is unknown or expired.
pub fn cli(command: &crate::cli::ApprovalsCommand) -> u8 {
    use crate::cli::ApprovalsCommand;
    use std::io::Write as _;
    let queue = match Queue::open_default() {
        Ok(queue) => queue,
        Err(e) => {
            eprintln!("apie-mcp: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    let (id, status, reason) = match command {
        ApprovalsCommand::List => {
            let pending = queue.list();
            if pending.is_empty() {
                let _ = writeln!(out, "no calls are waiting for approval");
            }
            let now = now_ms();
            for r in pending {
                let left = r.expires_ms.saturating_sub(now) / 1000;
                let rule = r.rule.as_deref().unwrap_or("-");
                let _ = writeln!(
                    out,
                    "{}  {}.{}  rule {rule}  expires in {left}s  (agent {}, pid {})\n    {}",
                    r.id, r.server, r.tool, r.agent_key, r.pid, r.reason
                );
            }
            return 0;
        }
        ApprovalsCommand::Approve { id } => (id, Status::Approved, None),
        ApprovalsCommand::Reject { id, reason } => (id, Status::Rejected, reason.clone()),
    };
    match queue.resolve(id, status, reason) {
        Ok(r) => {
            let _ = writeln!(
                out,
                "{} {}.{} ({})",
                status.as_str(),
                r.server,
                r.tool,
                r.id
            );
            0
        }
        Err(e) => {
            eprintln!("apie-mcp: {e}");
            1
        }
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // EPERM means it exists but belongs to someone else.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// How often a held call looks for its answer.
pub const POLL: Duration = Duration::from_millis(100);

/// Waits for the answer to `request`: `Approved` or `Rejected` as answered, `Timeout` when
/// `timeout` passes first. Removes the request either way.
pub async fn wait_local(
    queue: &Queue,
    request: &Request,
    timeout: Duration,
) -> (Status, Option<String>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let _cleanup = Cleanup(queue, &request.id);
    loop {
        if let Some(answer) = queue.answer(request) {
            return (answer.status, answer.reason);
        }
        if tokio::time::Instant::now() >= deadline {
            return (Status::Timeout, None);
        }
        tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// Removes a request from the queue when the wait ends, however it ends (also when the waiting
/// task is cancelled).
struct Cleanup<'a>(&'a Queue, &'a str);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, expires_in: u64) -> Request {
        Request {
            id: id.into(),
            tool: "deploy".into(),
            server: "ci".into(),
            agent_key: "a".into(),
            arguments_sha256: "abc".into(),
            rule: Some("prod".into()),
            reason: "needs a human".into(),
            created_ms: now_ms(),
            expires_ms: now_ms() + expires_in,
            pid: std::process::id(),
        }
    }

    #[tokio::test]
    async fn an_answer_ends_the_wait_and_is_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::at(dir.path());
        let r = request(&new_id(), 60_000);
        queue.submit(&r).unwrap();
        assert_eq!(queue.list(), vec![r.clone()]);
        let answering = {
            let queue = queue.clone();
            let id = r.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                queue.resolve(&id, Status::Rejected, Some("not today".into()))
            })
        };
        let (status, reason) = wait_local(&queue, &r, Duration::from_secs(5)).await;
        answering.await.unwrap().unwrap();
        assert_eq!(
            (status, reason.as_deref()),
            (Status::Rejected, Some("not today"))
        );
        assert!(queue.list().is_empty());
        assert!(matches!(
            queue.resolve(&r.id, Status::Approved, None),
            Err(QueueError::Unknown(_))
        ));
    }

    #[tokio::test]
    async fn unanswered_requests_time_out_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::at(dir.path());
        let r = request("apr_t", 60_000);
        queue.submit(&r).unwrap();
        let (status, _) = wait_local(&queue, &r, Duration::from_millis(50)).await;
        assert_eq!(status, Status::Timeout);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn answers_bind_to_the_call_and_expired_requests_cannot_be_answered() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::at(dir.path());
        let r = request("apr_b", 60_000);
        queue.submit(&r).unwrap();
        queue.resolve("apr_b", Status::Approved, None).unwrap();
        let other_call = Request {
            arguments_sha256: "different".into(),
            ..r.clone()
        };
        assert_eq!(queue.answer(&other_call), None);
        assert_eq!(queue.answer(&r).map(|a| a.status), Some(Status::Approved));
        let old = request("apr_old", 0);
        queue.submit(&old).unwrap();
        assert!(matches!(
            queue.resolve("apr_old", Status::Approved, None),
            Err(QueueError::Expired(_))
        ));
        // Listing sweeps what expired or whose proxy is gone.
        let orphan = Request {
            id: "apr_orphan".into(),
            pid: u32::MAX / 2,
            ..r.clone()
        };
        queue.submit(&orphan).unwrap();
        assert_eq!(queue.list(), vec![r.clone()]);
        assert!(!dir.path().join("apr_old.json").exists());
        assert!(!dir.path().join("apr_orphan.json").exists());
    }
}
