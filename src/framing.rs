//! Newline-delimited framing for the stdio streams.
//!
//! [`LineReader`] cuts a byte stream into lines without copying them (each line is a slice of
//! the read buffer) and caps their length: a line longer than the limit is discarded up to its
//! newline, so the stream stays in sync, and reported as [`Frame::TooLong`] with its first bytes
//! (enough to read an `id` from, see [`sniff_id`]). A trailing `\r` and a leading UTF-8 BOM are
//! stripped; empty lines are skipped.
//!
//! [`Outlet`] is the one writer of an output, whoever has a message for it: messages are queued
//! whole ([`Outlet::push`], which never waits on the output) and written with a newline each,
//! everything queued in one `writev`, by [`Outlet::flush`] (a reader thread, before it waits for
//! more input) or [`Outlet::flush_async`] (a task of the runtime, which never blocks on the
//! output: what a full pipe will not take at once is finished on the blocking pool).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use nix::poll::PollFlags;
use tokio::sync::Notify;

use crate::audit::Audit;

use crate::jsonrpc::Id;

/// How much of an over-long line is kept for [`sniff_id`].
const HEAD: usize = 64 * 1024;
/// How much is read at a time.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, PartialEq)]
pub enum Frame {
    Line(Bytes),
    /// A line over the limit, discarded; `head` is its beginning.
    TooLong {
        head: Bytes,
    },
}

pub struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    scratch: Box<[u8]>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
    /// Set while discarding an over-long line: its head.
    discarding: Option<Bytes>,
    /// Frames taken since the reader last waited for input: the burst so far.
    burst: u32,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, max_line: usize) -> Self {
        LineReader {
            inner,
            buf: BytesMut::with_capacity(CHUNK),
            scratch: vec![0; CHUNK].into_boxed_slice(),
            scanned: 0,
            max: max_line,
            discarding: None,
            burst: 0,
        }
    }

    /// The next frame, or `None` at end of input. `idle` runs whenever every complete line
    /// read so far has been taken and the reader is about to wait for more: the moment to flush
    /// what the lines produced.
    pub fn next(&mut self, mut idle: impl FnMut()) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.take_frame() {
                self.burst += 1;
                return Ok(Some(frame));
            }
            self.burst = 0;
            idle();
            if self.buf.capacity() - self.buf.len() < CHUNK {
                // Grow at least geometrically, so a long line costs amortised linear copying.
                let extra = CHUNK.max(self.buf.len().min(self.max + 1));
                self.buf.reserve(extra);
            }
            if self.read_more()? == 0 {
                return Ok(self.finish());
            }
        }
    }

    /// Whether the frame just taken is the 1st, 2nd, 4th, 8th… since the reader last waited:
    /// the moment to write on early what the burst has produced so far ([`Outlet::write_ready`]).
    ///
    /// When many messages arrive in one read, the next process starts on the first at once
    /// instead of after the whole burst has been worked through, while the writes per burst
    /// stay a handful. A message that comes alone is written as before, once, when the reader
    /// is idle. (Pipelined calls through the proxy: 10–15 % more per second than with one
    /// write per burst, in A/Bs on the 2-core machine; see the README.)
    pub fn early_write(&self) -> bool {
        self.burst.is_power_of_two()
    }

    /// One `read`, appended to the buffer. It goes through `scratch`, zeroed once, because a
    /// read straight into the buffer's spare capacity would need it zeroed before every read.
    fn read_more(&mut self) -> io::Result<usize> {
        loop {
            match self.inner.read(&mut self.scratch) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
                Ok(n) => {
                    self.buf.extend_from_slice(&self.scratch[..n]);
                    return Ok(n);
                }
            }
        }
    }

    /// Cuts the next complete frame out of the buffer, if there is one.
    fn take_frame(&mut self) -> Option<Frame> {
        loop {
            match memchr::memchr(b'\n', &self.buf[self.scanned..]) {
                Some(pos) => {
                    let end = self.scanned + pos;
                    let mut line = self.buf.split_to(end + 1);
                    self.scanned = 0;
                    line.truncate(end);
                    if let Some(head) = self.discarding.take() {
                        return Some(Frame::TooLong { head });
                    }
                    if let Some(frame) = self.frame(line) {
                        return Some(frame);
                    }
                }
                None => {
                    self.scanned = self.buf.len();
                    if self.discarding.is_none() && self.buf.len() > self.max + 1 {
                        let keep = self.buf.len().min(HEAD);
                        self.discarding = Some(Bytes::copy_from_slice(&self.buf[..keep]));
                    }
                    if self.discarding.is_some() {
                        self.buf.clear();
                        self.scanned = 0;
                    }
                    return None;
                }
            }
        }
    }

    /// End of input: an unterminated last line still counts.
    fn finish(&mut self) -> Option<Frame> {
        if let Some(head) = self.discarding.take() {
            self.buf.clear();
            return Some(Frame::TooLong { head });
        }
        let line = self.buf.split();
        self.scanned = 0;
        self.frame(line)
    }

    fn frame(&self, mut line: BytesMut) -> Option<Frame> {
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        if line.starts_with(b"\xEF\xBB\xBF") {
            let _ = line.split_to(3);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        if line.len() > self.max {
            let keep = line.len().min(HEAD);
            return Some(Frame::TooLong {
                head: line.freeze().slice(..keep),
            });
        }
        Some(Frame::Line(line.freeze()))
    }
}

/// Reads the top-level `"id"` of a (possibly truncated) JSON object, when it is a string or an
/// integer and lies within `head`.
pub fn sniff_id(head: &[u8]) -> Option<Id> {
    let mut p = Scanner { s: head, i: 0 };
    p.ws();
    p.eat(b'{')?;
    loop {
        p.ws();
        let key_start = p.i;
        p.string()?;
        let key = &head[key_start..p.i];
        p.ws();
        p.eat(b':')?;
        p.ws();
        let value_start = p.i;
        p.value()?;
        if key == b"\"id\"" {
            let raw = std::str::from_utf8(&head[value_start..p.i]).ok()?;
            let raw = serde_json::value::RawValue::from_string(raw.to_owned()).ok()?;
            return Id::from_raw((&*raw).into());
        }
        p.ws();
        p.eat(b',')?;
    }
}

/// A forgiving JSON skipper: enough to walk the top level of an object.
struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.i += 1)
    }
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(self.peek()?, b',' | b'}' | b' ' | b'\t' | b'\r' | b'\n') {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

/// Slices gathered into one `writev`.
const GATHER: usize = 64;
/// How much the host reader lets queue up for an output that is not taking it, reading on
/// meanwhile, so that it still sees the host's end of input and cancellations.
pub const BACKLOG: usize = 8 * 1024 * 1024;

/// One output (our stdout, or the server's stdin). Lines never tear: a message goes into the
/// queue whole, and only the holder of the write lock takes from the queue, finishing whatever
/// an earlier write left half-done before anything else.
pub struct Outlet {
    name: &'static str,
    /// Messages not yet taken by a writer.
    queue: Mutex<VecDeque<Bytes>>,
    writer: Mutex<Writer>,
    /// The descriptor is non-blocking, so a task of the runtime may try a write itself.
    nonblocking: bool,
    /// Bytes queued or taken and not yet written.
    backlog: AtomicUsize,
    /// Set once the output failed (or was closed): later messages are dropped.
    broken: AtomicBool,
    on_broken: Notify,
    /// Flushed before messages taken from the queue are written (see [`Outlet::behind`]).
    audit: Option<Arc<Audit>>,
}

struct Writer {
    file: Option<File>,
    /// Taken from the queue, not yet (wholly) written: messages and their newlines.
    out: VecDeque<Bytes>,
}

static NEWLINE: Bytes = Bytes::from_static(b"\n");

/// Whether a write may wait for the output to take it.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    Yes,
    No,
}

impl Outlet {
    /// An outlet writing to `file` (none: everything is dropped, as for a closed stdout).
    pub fn new(name: &'static str, file: Option<File>, nonblocking: bool) -> Outlet {
        let broken = file.is_none();
        Outlet {
            name,
            queue: Mutex::new(VecDeque::new()),
            writer: Mutex::new(Writer {
                file,
                out: VecDeque::new(),
            }),
            nonblocking,
            backlog: AtomicUsize::new(0),
            broken: AtomicBool::new(broken),
            on_broken: Notify::new(),
            audit: None,
        }
    }

    /// Makes this output never get ahead of `audit`: whatever was audited before a message was
    /// queued is in the log before the message is written. (Records are written in bursts, and
    /// a call's record is added before the call is queued.)
    pub fn behind(self, audit: Arc<Audit>) -> Outlet {
        Outlet {
            audit: Some(audit),
            ..self
        }
    }

    /// Queues one message (without its newline). Never waits on the output.
    pub fn push(&self, msg: Bytes) {
        if !self.is_broken() {
            let mut queue = lock(&self.queue);
            self.backlog.fetch_add(msg.len() + 1, Ordering::AcqRel);
            queue.push_back(msg);
        }
    }

    /// Like [`Outlet::flush`], but while the output does not take what is queued and less than
    /// [`BACKLOG`] is, it returns as soon as `input` has something to read (the reader reads on,
    /// and is back here when it waits again). A thread holding the write lock writes this
    /// thread's messages too, so it does not wait for that lock either, below [`BACKLOG`].
    pub fn flush_unless_readable(&self, input: BorrowedFd<'_>) {
        while !self.is_empty() {
            let under = self.backlog.load(Ordering::Acquire) < BACKLOG;
            let mut writer = match self.writer.try_lock() {
                Ok(writer) => writer,
                Err(_) if under => return,
                Err(_) => lock(&self.writer),
            };
            match self.write_out(&mut writer, Wait::No) {
                Ok(true) => {}
                Ok(false) => {
                    let Some(out) = writer.file.as_ref() else {
                        return;
                    };
                    let ready = if under {
                        crate::stdio::wait_either(input, out.as_fd())
                    } else {
                        crate::stdio::wait(out.as_fd(), PollFlags::POLLOUT).map(|()| false)
                    };
                    match ready {
                        Ok(true) => return,
                        Ok(false) => {}
                        Err(e) => {
                            self.fail(e);
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Writes what is queued as far as the output takes it at once, waiting for nothing: not for
    /// the output, nor for the write lock (its holder takes the queue too). What is left stays
    /// queued for the next flush. An output that only blocks is left alone: a write might wait.
    pub fn write_ready(&self) {
        if !self.nonblocking || self.is_empty() {
            return;
        }
        if let Ok(mut writer) = self.writer.try_lock() {
            let _ = self.write_out(&mut writer, Wait::No);
        }
    }

    /// Writes everything queued, waiting for the output as long as it takes. For threads.
    pub fn flush(&self) {
        // A task that found the lock taken left its message queued: it is taken here, after
        // the lock is let go, or by the thread that holds it next.
        while !self.is_empty() {
            let mut writer = lock(&self.writer);
            if self.write_out(&mut writer, Wait::Yes).is_err() {
                return;
            }
        }
    }

    /// Writes everything queued without blocking the calling task: the write is tried on the
    /// spot when the descriptor allows it, and finished on the blocking pool when the output
    /// cannot take it all at once (or while a thread is writing, which then writes it too).
    pub async fn flush_async(self: &Arc<Self>) {
        if self.is_empty() {
            return;
        }
        if self.nonblocking {
            loop {
                let Ok(mut writer) = self.writer.try_lock() else {
                    // The holder takes from the queue again after it lets go (see `flush`).
                    return;
                };
                match self.write_out(&mut writer, Wait::No) {
                    Ok(true) if self.is_empty() => return,
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(_) => return,
                }
            }
        }
        // What the output would not take at once (or a descriptor that only blocks).
        let outlet = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = outlet.write_out(&mut lock(&outlet.writer), Wait::Yes);
            outlet.flush();
        })
        .await;
    }

    /// Writes what is queued, then closes the output (the server sees end of input). Waits for
    /// the output: run it where that may take long.
    pub fn close(&self) {
        self.flush();
        let mut writer = lock(&self.writer);
        writer.file = None;
        writer.out.clear();
        self.set_broken();
    }

    /// Resolves once the output failed: the reader at the other end is gone.
    pub async fn broken(&self) {
        while !self.is_broken() {
            self.on_broken.notified().await;
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    fn set_broken(&self) {
        self.broken.store(true, Ordering::Release);
        lock(&self.queue).clear();
        self.backlog.store(0, Ordering::Release);
        self.on_broken.notify_one();
    }

    /// Nothing is queued, or taken and not yet written.
    fn is_empty(&self) -> bool {
        self.is_broken() || self.backlog.load(Ordering::Acquire) == 0
    }

    /// With the write lock held: writes what an earlier write left and everything queued.
    /// `Ok(false)`: the output would block and `wait` said not to.
    fn write_out(&self, writer: &mut Writer, wait: Wait) -> io::Result<bool> {
        let Writer { file, out } = writer;
        loop {
            if out.is_empty() {
                for msg in lock(&self.queue).drain(..) {
                    out.push_back(msg);
                    out.push_back(NEWLINE.clone());
                }
                if let Some(audit) = self.audit.as_ref().filter(|_| !out.is_empty()) {
                    audit.flush();
                }
            }
            if out.is_empty() {
                return Ok(true);
            }
            let Some(f) = file.as_mut() else {
                out.clear();
                self.set_broken();
                return Ok(true);
            };
            let mut slices = [IoSlice::new(&[]); GATHER];
            let n = out.len().min(GATHER);
            for (slice, msg) in slices.iter_mut().zip(out.iter()) {
                *slice = IoSlice::new(msg);
            }
            match f.write_vectored(&slices[..n]) {
                Ok(0) => return Err(self.fail(io::ErrorKind::WriteZero.into())),
                Ok(mut written) => {
                    self.backlog.fetch_sub(written, Ordering::AcqRel);
                    while written > 0 {
                        let Some(first) = out.front_mut() else { break };
                        if written >= first.len() {
                            written -= first.len();
                            out.pop_front();
                        } else {
                            first.advance(written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if wait == Wait::No {
                        return Ok(false);
                    }
                    if let Err(e) = crate::stdio::wait(f.as_fd(), PollFlags::POLLOUT) {
                        return Err(self.fail(e));
                    }
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    fn fail(&self, e: io::Error) -> io::Error {
        if !self.is_broken() {
            tracing::debug!(output = self.name, error = %e, "output closed");
        }
        self.set_broken();
        e
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let mut r = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(f) = r.next(|| {}).unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn lines_are_cut_and_cleaned() {
        let got = frames(b"\xEF\xBB\xBFa\r\n\n  \nb\nc", 100);
        assert_eq!(got, vec![line("a"), line("b"), line("c")]);
    }

    #[test]
    fn long_lines_are_discarded_and_the_stream_stays_in_sync() {
        let long = format!("{{\"id\":5,\"x\":\"{}\"}}", "y".repeat(300_000));
        let input = format!("a\n{long}\nb\n{long}");
        let got = frames(input.as_bytes(), 1000);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], line("a"));
        assert_eq!(got[2], line("b"));
        for f in [&got[1], &got[3]] {
            let Frame::TooLong { head } = f else {
                panic!("{f:?}")
            };
            assert_eq!(sniff_id(head), Some(Id::Number("5".into())));
        }
    }

    #[test]
    fn lines_of_megabytes_come_back_whole_and_the_limit_still_holds() {
        const MIB: usize = 1024 * 1024;
        let long = format!("{{\"id\":9,\"x\":\"{}\"}}", "z".repeat(3 * MIB));
        let input = format!("{long}\nafter\n{long}");
        let got = frames(input.as_bytes(), 4 * MIB);
        assert_eq!(got, vec![line(&long), line("after"), line(&long)]);
        let got = frames(input.as_bytes(), 2 * MIB);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], line("after"));
        for f in [&got[0], &got[2]] {
            let Frame::TooLong { head } = f else {
                panic!("{f:?}")
            };
            assert_eq!(sniff_id(head), Some(Id::Number("9".into())));
        }
    }

    #[test]
    fn the_limit_is_exact() {
        let got = frames(b"12345\n123456\n", 5);
        assert_eq!(got[0], line("12345"));
        assert!(matches!(got[1], Frame::TooLong { .. }));
    }

    #[test]
    fn ids_are_sniffed_from_heads() {
        let cases: [(&[u8], Option<Id>); 6] = [
            (
                br#"{"jsonrpc":"2.0","id":"a\"b","params":{"x"#,
                Some(Id::String("a\"b".into())),
            ),
            (
                br#"{"params":{"id":1,"x":[1,{"y":2}]},"id":-7}"#,
                Some(Id::Number("-7".into())),
            ),
            (br#"{"params":{"id":1,"x":"#, None),
            (br#"{"id":null}"#, None),
            (br#"[1,2]"#, None),
            (br#"{"id":1.5}"#, None),
        ];
        for (head, want) in cases {
            assert_eq!(sniff_id(head), want, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn early_writes_fall_on_the_powers_of_two_of_each_burst() {
        // Two reads: a burst of five lines, then one of three.
        let chunks: Vec<&[u8]> = vec![b"1\n2\n3\n4\n5\n", b"6\n7\n8\n"];
        let mut reader = LineReader::new(Chunks(chunks.into_iter()), 64);
        let mut marks = Vec::new();
        while let Some(frame) = reader.next(|| marks.push("idle")).unwrap() {
            assert!(matches!(frame, Frame::Line(_)));
            marks.push(if reader.early_write() { "write" } else { "-" });
        }
        let want = [
            "idle", "write", "write", "-", "write", "-", // 1..5
            "idle", "write", "write", "-", // 6..8
            "idle",
        ];
        assert_eq!(marks, want);
    }

    /// A reader that hands out one chunk per `read`.
    struct Chunks<I>(I);

    impl<'a, I: Iterator<Item = &'a [u8]>> Read for Chunks<I> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(chunk) = self.0.next() else {
                return Ok(0);
            };
            buf[..chunk.len()].copy_from_slice(chunk);
            Ok(chunk.len())
        }
    }

    // === Outlet ===

    use std::io::{BufRead, BufReader, PipeReader};
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    /// An outlet writing into a fresh pipe, and the pipe's other end.
    fn piped(nonblocking: bool) -> (Outlet, PipeReader) {
        let (reader, writer) = std::io::pipe().unwrap();
        let file = File::from(OwnedFd::from(writer));
        if nonblocking {
            crate::stdio::set_nonblocking(file.as_fd(), true).unwrap();
        }
        (Outlet::new("test", Some(file), nonblocking), reader)
    }

    #[test]
    fn write_ready_writes_what_the_output_takes_and_never_waits() {
        let (outlet, reader) = piped(true);
        let outlet = Arc::new(outlet);
        outlet.push(Bytes::from_static(b"one"));
        returns_at_once(&outlet);
        assert!(
            outlet.is_empty(),
            "what the pipe takes is written on the spot"
        );
        let mut lines = BufReader::new(reader);
        let mut got = String::new();
        lines.read_line(&mut got).unwrap();
        assert_eq!(got, "one\n");
        // While another writer holds the write lock, the message is left to that writer.
        let held = outlet.writer.lock().unwrap();
        outlet.push(Bytes::from_static(b"two"));
        returns_at_once(&outlet);
        assert!(!outlet.is_empty());
        drop(held);
        // A full pipe: what it does not take stays queued, and the call returns at once.
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        outlet.push(big.clone());
        returns_at_once(&outlet);
        assert!(!outlet.is_empty(), "a 1 MiB message cannot fit a pipe");
        outlet.push(Bytes::from_static(b"three"));
        let drain = std::thread::spawn(move || {
            let mut rest = Vec::new();
            for _ in 0..3 {
                let mut line = String::new();
                lines.read_line(&mut line).unwrap();
                rest.push(line.len());
            }
            rest
        });
        outlet.flush();
        assert_eq!(drain.join().unwrap(), [4, big.len() + 1, 6]);
        // An output that only blocks is left to the next flush.
        let (blocking, reader) = piped(false);
        let blocking = Arc::new(blocking);
        blocking.push(Bytes::from_static(b"four"));
        returns_at_once(&blocking);
        assert!(!blocking.is_empty());
        blocking.flush();
        let mut got = String::new();
        BufReader::new(reader).read_line(&mut got).unwrap();
        assert_eq!(got, "four\n");
    }

    /// Calls [`Outlet::write_ready`] on a thread of its own and fails if it has not returned
    /// within seconds (a write that waits would hang the test instead of failing it).
    fn returns_at_once(outlet: &Arc<Outlet>) {
        let (done, returned) = std::sync::mpsc::channel();
        let outlet = outlet.clone();
        std::thread::spawn(move || {
            outlet.write_ready();
            let _ = done.send(());
        });
        returned
            .recv_timeout(Duration::from_secs(5))
            .expect("write_ready waited");
    }

    fn message(producer: usize, n: usize) -> Bytes {
        // Sizes around and beyond a pipe's atomic write (4096), so writes come out partial.
        let pad = "x".repeat((producer * 997 + n * 131) % 9000);
        Bytes::from(format!("{producer}:{n}:{pad}"))
    }

    #[test]
    fn lines_from_many_threads_never_tear_and_keep_each_producers_order() {
        for nonblocking in [false, true] {
            let (outlet, reader) = piped(nonblocking);
            let outlet = Arc::new(outlet);
            let lines = std::thread::spawn(move || {
                BufReader::new(reader)
                    .lines()
                    .map(Result::unwrap)
                    .collect::<Vec<_>>()
            });
            let producers: Vec<_> = (0..4)
                .map(|p| {
                    let outlet = outlet.clone();
                    std::thread::spawn(move || {
                        for n in 0..200 {
                            outlet.push(message(p, n));
                            if n % 7 == 0 {
                                outlet.flush();
                            }
                        }
                        outlet.flush();
                    })
                })
                .collect();
            for p in producers {
                p.join().unwrap();
            }
            outlet.close();
            let lines = lines.join().unwrap();
            assert_eq!(lines.len(), 800);
            let mut next = [0usize; 4];
            for line in lines {
                let mut parts = line.splitn(3, ':');
                let p: usize = parts.next().unwrap().parse().unwrap();
                let n: usize = parts.next().unwrap().parse().unwrap();
                assert_eq!(n, next[p], "producer {p} out of order");
                assert_eq!(line.as_bytes(), &message(p, n)[..], "a torn line");
                next[p] += 1;
            }
        }
    }

    #[test]
    fn a_full_pipe_never_blocks_the_runtime() {
        let (outlet, reader) = piped(true);
        let outlet = Arc::new(outlet);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let big = Bytes::from(vec![b'y'; 1 << 20]);
        runtime.block_on(async {
            outlet.push(big.clone());
            let flushing = tokio::spawn({
                let outlet = outlet.clone();
                async move { outlet.flush_async().await }
            });
            // Nobody reads yet: the write cannot finish, but this task still runs.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!flushing.is_finished());
            let read = std::thread::spawn(move || {
                let mut line = Vec::new();
                BufReader::new(reader).read_until(b'\n', &mut line).unwrap();
                line
            });
            flushing.await.unwrap();
            let line = read.join().unwrap();
            assert_eq!(line.len(), big.len() + 1);
        });
    }

    #[test]
    fn the_audit_log_is_written_before_what_follows_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Arc::new(Audit::open(&path).unwrap());
        let (outlet, reader) = piped(false);
        let outlet = outlet.behind(audit.clone());
        let session = crate::audit::Session::new("run", "agent", "srv", "enforce");
        audit.write(&crate::audit::Record {
            tool: "deploy",
            ..crate::audit::Record::new(&session, "forwarded")
        });
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "", "buffered");
        outlet.push(Bytes::from_static(b"{}"));
        outlet.flush();
        let mut line = String::new();
        BufReader::new(reader).read_line(&mut line).unwrap();
        assert_eq!(line, "{}\n");
        assert!(std::fs::read_to_string(&path).unwrap().contains("deploy"));
    }

    #[test]
    fn an_output_whose_reader_is_gone_is_broken_and_drops_what_follows() {
        let (outlet, reader) = piped(true);
        drop(reader);
        outlet.push(Bytes::from_static(b"lost"));
        outlet.flush();
        assert!(outlet.is_broken());
        outlet.push(Bytes::from_static(b"dropped"));
        assert!(outlet.is_empty());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), outlet.broken())
                .await
                .expect("broken() resolves");
        });
    }

    #[test]
    fn the_host_reader_reads_on_while_an_output_is_full() {
        let (outlet, _unread) = piped(true);
        let (input, mut host) = std::io::pipe().unwrap();
        // More than the pipe holds: the rest stays queued.
        for n in 0..64 {
            outlet.push(message(1, n));
        }
        host.write_all(b"more input\n").unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let outlet = Arc::new(outlet);
        std::thread::spawn({
            let outlet = outlet.clone();
            move || {
                outlet.flush_unless_readable(input.as_fd());
                let _ = done.send(());
            }
        });
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("returned for the input");
        assert!(
            !outlet.is_empty(),
            "what the pipe did not take is still queued"
        );
    }
}
