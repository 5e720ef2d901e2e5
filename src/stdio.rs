//! The proxy's own stdin and stdout as non-blocking, reactor-driven handles.
//!
//! `tokio::io::stdin()` and `stdout()` hand every read and write to the blocking thread pool:
//! two thread hops per message, and a read that cannot be cancelled at shutdown. Hosts connect
//! stdio with pipes (or, like Node, with socket pairs), which the reactor can drive directly, so
//! those are taken over as such (on a duplicate of the descriptor, set non-blocking). Anything
//! else (a terminal, a file, `/dev/null`) keeps the thread-pool handles. stdout stays blocking
//! when stderr shares its pipe, so log lines can never meet a full non-blocking pipe.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use tokio::io::{AsyncRead, AsyncWrite};

pub type Input = Box<dyn AsyncRead + Send + Unpin>;
pub type Output = Box<dyn AsyncWrite + Send + Unpin>;

enum Kind {
    Pipe,
    Socket,
    Other,
}

fn kind(fd: BorrowedFd<'_>) -> Option<(Kind, (u64, u64), OwnedFd)> {
    let owned = fd.try_clone_to_owned().ok()?;
    let file = File::from(owned);
    let meta = file.metadata().ok()?;
    let t = meta.file_type();
    let kind = if t.is_fifo() {
        Kind::Pipe
    } else if t.is_socket() {
        Kind::Socket
    } else {
        Kind::Other
    };
    Some((kind, (meta.dev(), meta.ino()), OwnedFd::from(file)))
}

/// The host's side of our stdin.
pub fn stdin() -> Input {
    let reactor: Option<Input> = match kind(std::io::stdin().as_fd()) {
        Some((Kind::Pipe, _, fd)) => tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            .ok()
            .map(|r| Box::new(r) as Input),
        Some((Kind::Socket, _, fd)) => socket(fd).map(|s| Box::new(s) as Input),
        _ => None,
    };
    reactor.unwrap_or_else(|| Box::new(tokio::io::stdin()))
}

/// The host's side of our stdout.
pub fn stdout() -> Output {
    let stderr_id = kind(std::io::stderr().as_fd()).map(|(_, id, _)| id);
    let reactor: Option<Output> = match kind(std::io::stdout().as_fd()) {
        Some((_, id, _)) if Some(id) == stderr_id => None,
        Some((Kind::Pipe, _, fd)) => tokio::net::unix::pipe::Sender::from_owned_fd(fd)
            .ok()
            .map(|s| Box::new(s) as Output),
        Some((Kind::Socket, _, fd)) => socket(fd).map(|s| Box::new(s) as Output),
        _ => None,
    };
    reactor.unwrap_or_else(|| Box::new(tokio::io::stdout()))
}

fn socket(fd: OwnedFd) -> Option<tokio::net::UnixStream> {
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).ok()?;
    tokio::net::UnixStream::from_std(stream).ok()
}
