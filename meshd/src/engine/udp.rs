//! The one UDP socket of the engine: dual-stack where the host allows it.
//!
//! A leaf module with the engine's only `unsafe`: `recvmmsg(2)`, which
//! neither tokio nor socket2 offers.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

pub struct UdpPort {
    socket: UdpSocket,
    /// Bound to `[::]` with IPv4 mapped in; else IPv4 only.
    dual_stack: bool,
    port: u16,
}

/// Socket buffers large enough for bursts at line rate.
const SOCKET_BUFFER: usize = 4 << 20;

fn dual_stack_socket(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

fn v4_socket(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    Ok(s)
}

impl UdpPort {
    pub fn bind(port: u16) -> anyhow::Result<Self> {
        let (socket, dual_stack) = match dual_stack_socket(port) {
            Ok(s) => (s, true),
            Err(e) => {
                tracing::debug!(error = %e, "no IPv6 socket; using IPv4 only");
                (
                    v4_socket(port).map_err(|e| anyhow::anyhow!("binding UDP port {port}: {e}"))?,
                    false,
                )
            }
        };
        // Best effort: the kernel caps these at its configured maximum.
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket.into())?;
        let port = socket.local_addr()?.port();
        Ok(UdpPort {
            socket,
            dual_stack,
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        let target = match target {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        };
        self.socket.send_to(buf, target).await
    }

    /// Receives as many waiting datagrams as `batch` holds (at least one)
    /// with one system call: under load the receive loop pays one wake-up
    /// and one syscall per batch, not per datagram. IPv4-mapped sources
    /// come back as plain IPv4.
    pub async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        let fd = self.socket.as_raw_fd();
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || batch.receive(fd)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

fn canonical(from: SocketAddr) -> SocketAddr {
    match from.ip() {
        IpAddr::V6(v6) => SocketAddr::new(v6.to_canonical(), from.port()),
        IpAddr::V4(_) => from,
    }
}

/// The most datagrams one [`UdpPort::recv_batch`] call takes.
pub const MAX_BATCH: usize = 64;

/// Datagrams received together by [`UdpPort::recv_batch`]: buffers, and
/// after each call the length and source of each datagram received.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    received: Vec<(usize, SocketAddr)>,
    /// Datagrams cut short because they did not fit (dropped).
    pub truncated: u64,
}

impl RecvBatch {
    /// Room for `count` (at most [`MAX_BATCH`]) datagrams of up to `size`
    /// bytes each.
    pub fn new(count: usize, size: usize) -> Self {
        RecvBatch {
            bufs: (0..count.clamp(1, MAX_BATCH))
                .map(|_| vec![0u8; size].into_boxed_slice())
                .collect(),
            received: Vec::with_capacity(count),
            truncated: 0,
        }
    }

    /// The datagrams of the last receive, with their sources.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.received
            .iter()
            .zip(&self.bufs)
            .map(|((n, from), buf)| (&buf[..*n], *from))
    }

    /// One `recvmmsg(2)` without waiting; `WouldBlock` when nothing is there.
    /// Its headers live on the stack: nothing is allocated per call.
    fn receive(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        let count = self.bufs.len().min(MAX_BATCH);
        let mut addrs: [socket2::SockAddrStorage; MAX_BATCH] =
            std::array::from_fn(|_| socket2::SockAddrStorage::zeroed());
        // SAFETY: all-zero is a valid value of these plain C structs (null
        // pointers, zero lengths); the ones passed to the kernel are filled
        // in below.
        let mut iovecs: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, buf) in self.bufs.iter_mut().take(count).enumerate() {
            iovecs[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut addrs[i] as *mut socket2::SockAddrStorage).cast();
            h.msg_namelen = addrs[i].size_of();
            h.msg_iov = &mut iovecs[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: the first `count` headers point at buffers and address
        // slots (`SockAddrStorage` is `sockaddr_storage`, transparently)
        // that are valid, writable and not moved for the whole call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                count as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received.clear();
        let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
        for (msg, addr) in msgs.into_iter().zip(addrs).take(n as usize) {
            if msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                // Kept, empty, so lengths stay aligned with buffers; the
                // caller drops it as malformed.
                self.truncated += 1;
                self.received.push((0, nowhere));
                continue;
            }
            // SAFETY: the kernel wrote a socket address of `msg_namelen`
            // bytes into this storage.
            let from = unsafe { socket2::SockAddr::new(addr, msg.msg_hdr.msg_namelen) }.as_socket();
            match from {
                Some(from) => self.received.push((msg.msg_len as usize, canonical(from))),
                None => self.received.push((0, nowhere)),
            }
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_receives_every_waiting_datagram_with_its_source() {
        let port = UdpPort::bind(0).unwrap();
        let to = SocketAddr::from(([127, 0, 0, 1], port.port()));
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..5u8 {
            a.send_to(&[i; 10], to).unwrap();
        }
        b.send_to(&[9; 3000], to).unwrap();
        // Too big for the batch's buffers: counted, not delivered cut.
        b.send_to(&[7; 5000], to).unwrap();

        let mut batch = RecvBatch::new(4, 4096);
        let mut got = Vec::new();
        while got.len() < 7 {
            let n = port.recv_batch(&mut batch).await.unwrap();
            assert!((1..=4).contains(&n));
            got.extend(batch.iter().map(|(d, from)| (d.to_vec(), from)));
        }
        for (i, (d, from)) in got.iter().take(5).enumerate() {
            assert_eq!(d, &vec![i as u8; 10]);
            assert_eq!(*from, a.local_addr().unwrap());
        }
        assert_eq!(got[5], (vec![9; 3000], b.local_addr().unwrap()));
        assert!(got[6].0.is_empty(), "the oversized one is not passed on");
        assert_eq!(batch.truncated, 1);
    }
}
