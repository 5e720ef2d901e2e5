//! `socket_bridge <host:port>`: a stand-in upstream for transcript replay.
//!
//! Connects a TCP stream to the address, then copies stdin → socket and
//! socket → stdout on two threads, flushing after every line. A test listens
//! on the address and so plays the upstream MCP server from inside its own
//! process.
//!
//! When stdin reaches EOF the bridge shuts the socket's write half and exits
//! once the socket's read side ends. When the socket closes first, it exits
//! at once without waiting for stdin. The exit code is 0 in both cases; it is
//! 2 for a usage error and 1 when the connection cannot be made.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), None) = (args.next(), args.next()) else {
        eprintln!("usage: socket_bridge <host:port>");
        std::process::exit(2);
    };
    let stream = match TcpStream::connect(&addr) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("socket_bridge: cannot connect to {addr}: {e}");
            std::process::exit(1);
        }
    };
    let _ = stream.set_nodelay(true);
    let (to_socket, from_socket) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("socket_bridge: cannot clone the socket: {e}");
            std::process::exit(1);
        }
    };

    // stdin → socket. At stdin EOF (or a write error) shut the write half so
    // the peer sees EOF; the main thread keeps reading until the peer is done.
    std::thread::spawn(move || {
        let mut socket = to_socket;
        copy_lines(&mut std::io::stdin().lock(), &mut socket);
        let _ = socket.shutdown(Shutdown::Write);
    });

    // socket → stdout on the main thread: when the socket's read side ends the
    // process exits, without waiting for the stdin thread.
    copy_lines(
        &mut BufReader::new(from_socket),
        &mut std::io::stdout().lock(),
    );
    let _ = stream.shutdown(Shutdown::Both);
    std::process::exit(0);
}

/// Copies `from` to `to` a line at a time, flushing each, until EOF or an error on either side.
fn copy_lines(from: &mut impl BufRead, to: &mut impl Write) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match from.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if to.write_all(&line).and_then(|()| to.flush()).is_err() {
                    return;
                }
            }
        }
    }
}
