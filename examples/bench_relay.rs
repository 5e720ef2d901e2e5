//! `bench_relay`: the zero-work byte relay of the performance benchmark (`benches/proxy.rs`).
//!
//! `bench_relay COMMAND [ARGS...]` spawns the command and copies bytes both ways, stdin → the
//! child's stdin and the child's stdout → stdout, with one thread and one 256 KiB buffer per
//! direction: each read is written on at once, nothing is parsed, framed or buffered across
//! reads. It is the physical floor of having any process between a host and a server: two extra
//! pipe hops and the wake-ups they cost. The proxy has to do at least this much, plus its own
//! work.
//!
//! When its stdin ends it closes the child's stdin; it exits with the child's status once the
//! child's stdout has ended and the child has exited.

use std::io::{Read, Write};
use std::os::fd::AsFd as _;
use std::process::{Command, ExitCode, Stdio};

const BUF: usize = 256 * 1024;

/// Copies until `from` ends; every read is written (and so reaches the pipe) before the next.
fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: bench_relay COMMAND [ARGS...]");
        return ExitCode::from(64);
    };
    let mut child = match Command::new(&program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "bench_relay: cannot start {}: {e}",
                program.to_string_lossy()
            );
            return ExitCode::from(127);
        }
    };
    let (Some(child_in), Some(child_out)) = (child.stdin.take(), child.stdout.take()) else {
        return ExitCode::from(1);
    };
    // Our own stdin and stdout as plain files (duplicated descriptors): no std line buffering
    // or locking in the way, one read and one write per chunk.
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(std::fs::File::from);
    let (Ok(stdin), Ok(stdout)) = (
        dup(std::io::stdin().as_fd()),
        dup(std::io::stdout().as_fd()),
    ) else {
        eprintln!("bench_relay: cannot duplicate stdin/stdout");
        return ExitCode::from(1);
    };
    // Host → child on its own thread: dropping `child_in` at the end closes the child's stdin.
    std::thread::spawn(move || pump(stdin, child_in));
    pump(child_out, stdout);
    match child.wait() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(_) => ExitCode::from(1),
    }
}
