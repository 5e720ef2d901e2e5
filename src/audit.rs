//! The audit log (SPEC §8): one JSON object per line per evaluated call.
//!
//! Each record is appended with one `write` to a file opened for appending, so it is in the file
//! (the kernel's page cache) before the call it describes goes on, and lines from several
//! proxies sharing a log never interleave. That costs a few microseconds per call; handing lines
//! to a writer thread cost more, in the wake-up alone. Arguments are never written, only their
//! SHA-256.

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
    pub request_id: Option<serde_json::Value>,
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
    line: Vec<u8>,
}

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
                line: Vec::with_capacity(512),
            })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Appends one record as one line.
    pub fn write(&self, record: &Record<'_>) {
        let Some(sink) = &self.file else { return };
        let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
        let Sink { file, path, line } = &mut *sink;
        let Some(file) = file else { return };
        line.clear();
        if let Err(e) = serde_json::to_writer(&mut *line, record) {
            tracing::error!(error = %e, "audit record not serialisable");
            return;
        }
        line.push(b'\n');
        if let Err(e) = file.write_all(line) {
            tracing::error!(path = %path.display(), error = %e, "audit write failed");
        }
    }

    /// Stops writing (a reader thread may outlive the session); every record written so far
    /// is in the file.
    pub fn close(&self) {
        if let Some(sink) = &self.file {
            sink.lock().unwrap_or_else(|e| e.into_inner()).file = None;
        }
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
            audit.write(&Record {
                ts: now(),
                run_id: "run_mcp_x",
                agent_key: "agent",
                server: "srv",
                mode: "enforce",
                request_id: Some(serde_json::json!(1)),
                tool: "echo",
                risk_level: Some("low"),
                decision: Some("allow"),
                outcome,
                rule: Some("r"),
                guardrail: None,
                reason: None,
                approval_id: None,
                status: None,
                latency_ms: 0.1,
                arguments_sha256: Some("ab"),
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
