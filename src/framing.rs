//! Newline-delimited framing for the stdio streams.
//!
//! [`LineReader`] cuts a byte stream into lines without copying them (each line is a slice of
//! the read buffer) and caps their length: a line longer than the limit is discarded up to its
//! newline, so the stream stays in sync, and reported as [`Frame::TooLong`] with its first bytes
//! (enough to read an `id` from, see [`sniff_id`]). A trailing `\r` and a leading UTF-8 BOM are
//! stripped; empty lines are skipped. The buffer lives on the struct, so `next` may be cancelled
//! in a `select!` without losing a partial line.
//!
//! [`write_loop`] is the one writer of an output: it writes each message and a newline, and
//! flushes whenever no further message is queued.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

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
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
    /// Set while discarding an over-long line: its head.
    discarding: Option<Bytes>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max_line: usize) -> Self {
        LineReader {
            inner,
            buf: BytesMut::with_capacity(CHUNK),
            scanned: 0,
            max: max_line,
            discarding: None,
        }
    }

    /// The next frame, or `None` at end of input. Cancel-safe.
    pub async fn next(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < CHUNK {
                // Grow at least geometrically, so a long line costs amortised linear copying.
                let extra = CHUNK.max(self.buf.len().min(self.max + 1));
                self.buf.reserve(extra);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Ok(self.finish());
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
            return Id::from_raw(&raw);
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

/// Messages up to this size are copied into the write buffer; larger ones are written from
/// where they are.
const COPY_MAX: usize = 64 * 1024;
/// A write gathers queued messages up to about this much.
const GATHER: usize = 256 * 1024;

/// The single writer of one output: writes each queued message plus `\n`, gathering whatever
/// is already queued into one write, and flushing whenever the queue is momentarily empty.
/// Returns when every sender is gone (after a final flush) or the output fails.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut out: W,
    mut rx: mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(COPY_MAX);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if msg.len() > COPY_MAX {
                if !buf.is_empty() {
                    out.write_all(&buf).await?;
                    buf.clear();
                }
                out.write_all(&msg).await?;
                out.write_all(b"\n").await?;
            } else {
                buf.extend_from_slice(&msg);
                buf.push(b'\n');
            }
            if buf.len() < GATHER {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            out.write_all(&buf).await?;
            buf.clear();
        }
        if buf.capacity() > 4 * GATHER {
            buf.shrink_to(COPY_MAX);
        }
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let mut r = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(f) = r.next().await.unwrap() {
            out.push(f);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[tokio::test]
    async fn lines_are_cut_and_cleaned() {
        let got = frames(b"\xEF\xBB\xBFa\r\n\n  \nb\nc", 100).await;
        assert_eq!(got, vec![line("a"), line("b"), line("c")]);
    }

    #[tokio::test]
    async fn long_lines_are_discarded_and_the_stream_stays_in_sync() {
        let long = format!("{{\"id\":5,\"x\":\"{}\"}}", "y".repeat(300_000));
        let input = format!("a\n{long}\nb\n{long}");
        let got = frames(input.as_bytes(), 1000).await;
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

    #[tokio::test]
    async fn the_limit_is_exact() {
        let got = frames(b"12345\n123456\n", 5).await;
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
}
