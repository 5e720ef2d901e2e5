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

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::jsonrpc::write_str;

/// One audit line.
///
/// The derived `Serialize` is the format's definition; records are written by
/// [`Record::write_json`], which writes the same bytes without `serde`'s per-field work (a test
/// holds the two together).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record<'a> {
    #[serde(serialize_with = "serialize_ts")]
    pub ts: SystemTime,
    #[serde(flatten)]
    pub session: &'a Session,
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

/// Who wrote a record: the same for every record of a session, so its members are written out
/// once, when the session starts, and copied into each record.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    run_id: String,
    agent_key: String,
    server: String,
    mode: &'static str,
    /// `,"runId":…,"agentKey":…,"server":…,"mode":…`: the members above as a record writes
    /// them.
    #[serde(skip)]
    members: Box<[u8]>,
}

impl Session {
    pub fn new(run_id: &str, agent_key: &str, server: &str, mode: &'static str) -> Session {
        let mut members = Vec::new();
        let mut m = Members(&mut members);
        m.text("runId", run_id);
        m.text("agentKey", agent_key);
        m.text("server", server);
        m.text("mode", mode);
        Session {
            run_id: run_id.to_owned(),
            agent_key: agent_key.to_owned(),
            server: server.to_owned(),
            mode,
            members: members.into(),
        }
    }
}

impl<'a> Record<'a> {
    /// A record of `session`, stamped now, with nothing but the `outcome` filled in.
    pub fn new(session: &'a Session, outcome: &'a str) -> Record<'a> {
        Record {
            ts: SystemTime::now(),
            session,
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

impl Record<'_> {
    /// Appends the record as one JSON object (no newline): the text `Serialize` writes, member
    /// for member in its order.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        write_ts(out, self.ts);
        out.push(b'"');
        out.extend_from_slice(&self.session.members);
        let mut m = Members(out);
        m.key("requestId");
        match self.request_id {
            Some(id) => id.write_json(m.0),
            None => m.0.extend_from_slice(b"null"),
        }
        m.text("tool", self.tool);
        m.text_or_null("riskLevel", self.risk_level);
        m.text_or_null("decision", self.decision);
        m.text("outcome", self.outcome);
        m.text_or_null("rule", self.rule);
        m.text_if_some("guardrail", self.guardrail);
        m.text_or_null("reason", self.reason);
        m.text_if_some("approvalId", self.approval_id);
        m.text_if_some("status", self.status);
        m.key("latencyMs");
        // A number into a Vec cannot fail (NaN and infinities are written as `null`).
        let _ = serde_json::to_writer(&mut *m.0, &self.latency_ms);
        m.text_or_null("argumentsSha256", self.arguments_sha256);
        m.0.push(b'}');
    }
}

/// Writes the members after the first of an object being written by hand.
struct Members<'o>(&'o mut Vec<u8>);

impl Members<'_> {
    /// `,"key":` (keys here are plain ASCII, never escaped).
    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        write_str(self.0, value);
    }

    fn text_or_null(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.text(key, value),
            None => {
                self.key(key);
                self.0.extend_from_slice(b"null");
            }
        }
    }

    /// Leaves the member out when there is no value (`skip_serializing_if`).
    fn text_if_some(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.text(key, value);
        }
    }
}

/// `ts` as RFC 3339 with milliseconds, UTC (`2026-11-23T16:39:53.068Z`).
pub fn rfc3339(ts: SystemTime) -> String {
    let mut text = Vec::with_capacity(24);
    write_ts(&mut text, ts);
    String::from_utf8(text).unwrap_or_default()
}

fn serialize_ts<S: serde::Serializer>(ts: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*ts))
}

/// Appends `ts` as `humantime` writes it with milliseconds; the date and the time of day are
/// formatted once a second, per thread.
fn write_ts(out: &mut Vec<u8>, ts: SystemTime) {
    const HEAD: usize = "2026-11-23T16:39:53".len();
    thread_local! {
        static SECOND: Cell<(u64, [u8; HEAD])> = const { Cell::new((u64::MAX, [0; HEAD])) };
    }
    let Ok(since) = ts.duration_since(UNIX_EPOCH) else {
        return out.extend_from_slice(humantime::format_rfc3339_millis(ts).to_string().as_bytes());
    };
    let seconds = since.as_secs();
    let (cached, mut head) = SECOND.get();
    if cached != seconds {
        let text = humantime::format_rfc3339_seconds(ts).to_string();
        head.copy_from_slice(&text.as_bytes()[..HEAD]);
        SECOND.set((seconds, head));
    }
    let millis = since.subsec_millis();
    out.extend_from_slice(&head);
    out.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
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
        record.write_json(&mut sink.lines);
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
    fn records_are_written_as_serde_writes_them() {
        use crate::jsonrpc::Id;
        use std::time::Duration;
        let ids = [
            None,
            Some(Id::Number("7".into())),
            Some(Id::Number("-0".into())),
            Some(Id::Number("123456789012345678901234567890".into())),
            Some(Id::String("a\"b\\c\u{1}é".into())),
            Some(Id::String("back\\slash".into())),
        ];
        let texts = [
            "",
            "plain",
            "back\\slash",
            "tab\tonly",
            "quote \" backslash \\ controls \n\t\r\u{0}\u{8}\u{c}\u{1f} del \u{7f}",
            "ünïcödé ✓ 😀 \u{2028}",
        ];
        // Seconds that come back after another (the cache of the formatted second), the first
        // and last millisecond of a second, and a leap day.
        let times = [
            0,
            1_795_000_000_999,
            1_795_000_001_000,
            1_795_000_000_500,
            1_709_208_000_123,
        ]
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        let session = Session::new("run_mcp_x", "agent \"k\"\n", "srv", "enforce");
        let mut n = 0;
        for (i, id) in ids.iter().enumerate() {
            for (j, text) in texts.iter().enumerate() {
                for (k, ts) in times.iter().enumerate() {
                    let some = |x: usize| x.is_multiple_of(2).then_some(*text);
                    let record = Record {
                        ts: *ts,
                        request_id: id.as_ref(),
                        tool: text,
                        risk_level: some(i),
                        decision: some(j + 1),
                        rule: some(k),
                        guardrail: some(i + j),
                        reason: some(j + k + 1),
                        approval_id: some(i + k + 1),
                        status: some(i + j + k),
                        latency_ms: [0.0, 0.123456, 1234.5, f64::NAN][(i + j + k) % 4],
                        arguments_sha256: some(i + 1),
                        ..Record::new(&session, text)
                    };
                    let mut mine = Vec::new();
                    record.write_json(&mut mine);
                    let serde = serde_json::to_vec(&record).unwrap();
                    assert_eq!(
                        String::from_utf8(mine).unwrap(),
                        String::from_utf8(serde).unwrap()
                    );
                    n += 1;
                }
            }
        }
        assert_eq!(n, 6 * 6 * 5);
        assert_eq!(
            rfc3339(SystemTime::now()).len(),
            "2026-11-23T16:39:53.068Z".len()
        );
    }

    #[test]
    fn records_are_appended_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/audit.jsonl");
        for outcome in ["forwarded", "blocked"] {
            let audit = Audit::open(&path).unwrap();
            let session = Session::new("run_mcp_x", "agent", "srv", "enforce");
            audit.write(&Record {
                request_id: Some(&crate::jsonrpc::Id::Number("1".into())),
                tool: "echo",
                risk_level: Some("low"),
                decision: Some("allow"),
                rule: Some("r"),
                latency_ms: 0.1,
                arguments_sha256: Some("ab"),
                ..Record::new(&session, outcome)
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
