//! A minimal HTTP/1.1 server for end-to-end tests: `GET /` says who serves,
//! `GET /bytes/N` returns N pseudo-random bytes with their SHA-256 in the
//! `x-sha256` header. Std only, so it runs anywhere the tests run.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

fn body_bytes(n: usize) -> Vec<u8> {
    // xorshift: cheap, deterministic, incompressible enough.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn handle(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let peer = stream.peer_addr()?;
    let (status, body, extra) = match path.strip_prefix("/bytes/").map(str::parse::<usize>) {
        Some(Ok(n)) if n <= 1 << 30 => {
            let body = body_bytes(n);
            let sum = <sha2::Sha256 as sha2::Digest>::digest(&body);
            (
                "200 OK",
                body,
                format!("x-sha256: {}\r\n", hex::encode(sum)),
            )
        }
        Some(_) => ("400 Bad Request", b"bad size\n".to_vec(), String::new()),
        None => (
            "200 OK",
            format!("hello from {name}; you are {}\n", peer.ip()).into_bytes(),
            String::new(),
        ),
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
        body.len()
    )?;
    out.write_all(&body)?;
    out.flush()
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(name)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: overlay-httpd LISTEN_ADDR NAME");
        return std::process::ExitCode::FAILURE;
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("overlay-httpd: binding {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = handle(stream, &name);
        });
    }
    std::process::ExitCode::SUCCESS
}
