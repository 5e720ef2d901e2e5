//! The descriptors the relay's threads read and write: our own stdin and stdout, and the
//! server's pipes.
//!
//! Each direction of the relay is read by a thread of its own that blocks in `read`, the way a
//! bare byte relay does: one wake-up per burst of input, no event loop in between. A descriptor
//! may be non-blocking all the same (a host may hand one over so, and the proxy makes its
//! outputs so where it safely can, see [`stdout`]); then `EAGAIN` waits in `poll`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::framing::Outlet;

/// A blocking reader over a descriptor that may be non-blocking.
pub struct Input(Option<File>);

impl Input {
    pub fn new(fd: OwnedFd) -> Input {
        Input(Some(File::from(fd)))
    }

    /// A second descriptor for the same input, to `poll` on while the first is being read.
    pub fn watch(&self) -> Option<OwnedFd> {
        self.0.as_ref()?.as_fd().try_clone_to_owned().ok()
    }
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(file) = &mut self.0 else {
            return Ok(0);
        };
        loop {
            match file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(file.as_fd(), PollFlags::POLLIN)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Blocks until `fd` is ready for `events` (or has hung up, which the next call reports).
pub fn wait(fd: BorrowedFd<'_>, events: PollFlags) -> io::Result<()> {
    let mut fds = [PollFd::new(fd, events)];
    match poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Blocks until `input` has something to read (`true`) or `output` takes more (`false`).
pub fn wait_either(input: BorrowedFd<'_>, output: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [
        PollFd::new(input, PollFlags::POLLIN),
        PollFd::new(output, PollFlags::POLLOUT),
    ];
    match poll(&mut fds, PollTimeout::NONE) {
        Ok(_) => Ok(fds[0].any().unwrap_or(false)),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Sets or clears `O_NONBLOCK` on the open file description behind `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Our stdin, as the host reader's input (a duplicate of descriptor 0; closed stdin reads as
/// end of input).
pub fn stdin() -> Input {
    Input(
        io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(File::from),
    )
}

/// Our stdout, as the host's [`Outlet`]. A pipe or socket is made non-blocking, so that tasks
/// of the runtime can write to it without ever stalling there; anything else (a terminal, a
/// file), or a stdout that stderr shares (log lines must never meet a full non-blocking pipe,
/// nor should the server, which inherits our stderr), stays as it is.
pub fn stdout() -> Outlet {
    let Ok(fd) = io::stdout().as_fd().try_clone_to_owned() else {
        return Outlet::new("stdout", None, false);
    };
    let file = File::from(fd);
    let id = |f: &File| f.metadata().ok().map(|m| (m.dev(), m.ino(), m.file_type()));
    let stderr = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(File::from);
    let ours = id(&file);
    let shared_with_stderr =
        stderr.as_ref().and_then(id).map(|(d, i, _)| (d, i)) == ours.map(|(d, i, _)| (d, i));
    let stream = ours.is_some_and(|(_, _, t)| t.is_fifo() || t.is_socket());
    let nonblocking = stream && !shared_with_stderr && set_nonblocking(file.as_fd(), true).is_ok();
    Outlet::new("stdout", Some(file), nonblocking)
}
