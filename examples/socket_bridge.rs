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

use std::io::{BufRead as _, BufReader, Write as _};
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
        let mut stdin = std::io::stdin().lock();
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if socket
                        .write_all(&line)
                        .and_then(|()| socket.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = socket.shutdown(Shutdown::Write);
    });

    // socket → stdout on the main thread: when the socket's read side ends the
    // process exits, without waiting for the stdin thread.
    let mut socket = BufReader::new(from_socket);
    let mut stdout = std::io::stdout().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match socket.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if stdout
                    .write_all(&line)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    std::process::exit(0);
}
