//! The one UDP socket of the engine: dual-stack where the host allows it.
//!
//! A leaf module with `unsafe`: `recvmmsg(2)` and `sendmsg(2)` with a
//! `UDP_SEGMENT` control message (GSO), which neither tokio nor socket2
//! offers.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

pub struct UdpPort {
    socket: UdpSocket,
    /// Bound to `[::]` with IPv4 mapped in; else IPv4 only.
    dual_stack: bool,
    port: u16,
    /// Segmentation offload on send (`UDP_SEGMENT`) works here; cleared
    /// for good the first time the kernel refuses it.
    gso: AtomicBool,
}

/// `UDP_SEGMENT` (linux/udp.h).
const UDP_SEGMENT: libc::c_int = 103;
/// The kernel's cap on segments in one GSO send.
pub const MAX_GSO_SEGMENTS: usize = 64;
/// One send carries at most this many bytes (UDP's length field).
pub const MAX_GSO_BYTES: usize = 65_535 - 8 - 40;

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
            gso: AtomicBool::new(true),
        })
    }

    /// Whether sends still use segmentation offload.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    fn wire_target(&self, target: SocketAddr) -> SocketAddr {
        match target {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }

    /// Sends `buf`, datagrams of `segment` bytes back to back (the last
    /// may be shorter), to `target` with as few system calls as the kernel
    /// allows: one with segmentation offload, else one per datagram. A
    /// kernel or device that refuses offload (`EIO`: no checksum offload
    /// on the way out; `EINVAL`, `ENOPROTOOPT`: no GSO) turns it off for
    /// good and the batch goes out one by one.
    pub async fn send_segments(
        &self,
        buf: &[u8],
        segment: usize,
        target: SocketAddr,
    ) -> io::Result<()> {
        if buf.len() > segment && self.gso() {
            let to = socket2::SockAddr::from(self.wire_target(target));
            let sent = self
                .socket
                .async_io(Interest::WRITABLE, || {
                    use std::os::fd::AsRawFd as _;
                    send_gso(self.socket.as_raw_fd(), buf, segment, &to)
                })
                .await;
            match sent {
                Ok(()) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                    ) =>
                {
                    tracing::info!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        for d in buf.chunks(segment.max(1)) {
            self.send_to(d, target).await?;
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn send_to(&self, buf: &[u8], target: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(buf, self.wire_target(target)).await
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

/// One `sendmsg(2)` of `buf` as datagrams of `segment` bytes, without
/// waiting; `WouldBlock` when the socket buffer is full.
fn send_gso(
    fd: std::os::fd::RawFd,
    buf: &[u8],
    segment: usize,
    to: &socket2::SockAddr,
) -> io::Result<()> {
    let segment =
        u16::try_from(segment).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // A cmsghdr and one u16, aligned as the kernel reads it.
    #[repr(C, align(8))]
    struct Control([u8; 32]);
    let mut control = Control([0; 32]);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: `msg` points at `control`, which has room for one cmsghdr
    // with 2 bytes of data (CMSG_SPACE(2) <= 32), so CMSG_FIRSTHDR is
    // non-null and its data area writable.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
    // SAFETY: every pointer in `msg` (address, iovec over `buf`, control)
    // is valid for the whole call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

    #[tokio::test]
    async fn segments_arrive_as_separate_datagrams() {
        let port = UdpPort::bind(0).unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        // 40 datagrams of 1452 bytes and a short last one, in one send.
        let mut buf = Vec::new();
        for i in 0..40u8 {
            buf.extend_from_slice(&[i; 1452]);
        }
        buf.extend_from_slice(&[99; 100]);
        port.send_segments(&buf, 1452, rx.local_addr().unwrap())
            .await
            .unwrap();
        let mut got = vec![0u8; 2000];
        for i in 0..40u8 {
            let (n, from) = rx.recv_from(&mut got).unwrap();
            assert_eq!(from.port(), port.port());
            assert_eq!(&got[..n], &[i; 1452][..], "datagram {i}");
        }
        let (n, _) = rx.recv_from(&mut got).unwrap();
        assert_eq!(&got[..n], &[99; 100][..]);
    }
}
