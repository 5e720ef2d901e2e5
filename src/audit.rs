//! The audit log (SPEC §8): one JSON object per line per evaluated call.
//!
//! Records are buffered and appended together, one `write` per burst, to a file opened for
//! appending, so lines from several proxies sharing a log never interleave. A record is in the
//! file (the kernel's page cache) before the call it describes goes on: an [`Outlet`] that
//! carries the call, or its answer, flushes the log before it writes (see
//! [`Outlet::behind`]); whoever writes records flushes the log before waiting for anything
//! else. A `write` per record cost a few microseconds per call; a writer thread cost more, in the
//! wake-up alone. Arguments are never written, only their SHA-256.
//!
//! [`Outlet`]: crate::framing::Outlet
//! [`Outlet::behind`]: crate::framing::Outlet::behind

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One audit line.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record<'a> {
    pub ts: String,
    pub run_id: &'a str,
    pub agent_key: &'a str,
    pub server: &'a str,
    pub mode: &'a str,
    pub request_id: Option<&'a crate::jsonrpc::Id>,
    pub tool: &'a str,
    pub risk_level: Option<&'a str>,
    pub decision: Option<&'a str>,
    pub outcome: &'a str,
    /// The local rule that decided; `null` when none did (`riskDefaults`, or the service's
    /// `guardrail` below).
    pub rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guardrail: Option<&'a str>,
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'a str>,
    pub latency_ms: f64,
    pub arguments_sha256: Option<&'a str>,
}

/// Who wrote a record: the same for every record of a session.
#[derive(Debug, Clone, Copy)]
pub struct Session<'a> {
    pub run_id: &'a str,
    pub agent_key: &'a str,
    pub server: &'a str,
    pub mode: &'a str,
}

impl<'a> Record<'a> {
    /// A record of `session`, stamped now, with nothing but the `outcome` filled in.
    pub fn new(session: Session<'a>, outcome: &'a str) -> Record<'a> {
        Record {
            ts: now(),
            run_id: session.run_id,
            agent_key: session.agent_key,
            server: session.server,
            mode: session.mode,
            request_id: None,
            tool: "",
            risk_level: None,
            decision: None,
            outcome,
            rule: None,
            guardrail: None,
            reason: None,
            approval_id: None,
            status: None,
            latency_ms: 0.0,
            arguments_sha256: None,
        }
    }
}

/// The current time as RFC 3339 with milliseconds, UTC.
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open audit log {path}: {source}")]
pub struct AuditError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The audit sink; `Audit::disabled()` drops everything.
pub struct Audit {
    file: Option<Mutex<Sink>>,
}

struct Sink {
    /// `None` once closed.
    file: Option<File>,
    path: PathBuf,
    /// Records not yet written, one per line.
    lines: Vec<u8>,
}

/// Buffered records are written at once beyond this much.
const FLUSH_AT: usize = 64 * 1024;

impl Audit {
    pub fn disabled() -> Audit {
        Audit { file: None }
    }

    /// Opens (creating it and its directory) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        let err = |source| AuditError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Audit {
            file: Some(Mutex::new(Sink {
                file: Some(file),
                path: path.to_owned(),
                lines: Vec::with_capacity(FLUSH_AT),
            })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Adds one record as one line; it is written by the next [`Audit::flush`].
    pub fn write(&self, record: &Record<'_>) {
        let Some(sink) = &self.file else { return };
        let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
        if sink.file.is_none() {
            return;
        }
        let start = sink.lines.len();
        if let Err(e) = serde_json::to_writer(&mut sink.lines, record) {
            sink.lines.truncate(start);
            tracing::error!(error = %e, "audit record not serialisable");
            return;
        }
        sink.lines.push(b'\n');
        if sink.lines.len() >= FLUSH_AT {
            sink.write_out();
        }
    }

    /// Writes the buffered records.
    pub fn flush(&self) {
        if let Some(sink) = &self.file {
            sink.lock().unwrap_or_else(|e| e.into_inner()).write_out();
        }
    }

    /// Writes the buffered records and stops (a reader thread may outlive the session).
    pub fn close(&self) {
        if let Some(sink) = &self.file {
            let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
            sink.write_out();
            sink.file = None;
        }
    }
}

impl Sink {
    fn write_out(&mut self) {
        let Sink { file, path, lines } = self;
        if lines.is_empty() {
            return;
        }
        if let Some(file) = file
            && let Err(e) = file.write_all(lines)
        {
            tracing::error!(path = %path.display(), error = %e, "audit write failed");
        }
        lines.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_appended_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/audit.jsonl");
        for outcome in ["forwarded", "blocked"] {
            let audit = Audit::open(&path).unwrap();
            let session = Session {
                run_id: "run_mcp_x",
                agent_key: "agent",
                server: "srv",
                mode: "enforce",
            };
            audit.write(&Record {
                request_id: Some(&crate::jsonrpc::Id::Number("1".into())),
                tool: "echo",
                risk_level: Some("low"),
                decision: Some("allow"),
                rule: Some("r"),
                latency_ms: 0.1,
                arguments_sha256: Some("ab"),
                ..Record::new(session, outcome)
            });
            audit.close();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "forwarded");
        assert_eq!(lines[1]["outcome"], "blocked");
        assert_eq!(lines[1]["runId"], "run_mcp_x");
        assert!(lines[1].get("guardrail").is_none());
        assert!(lines[1]["ts"].as_str().unwrap().ends_with('Z'));
    }
}
