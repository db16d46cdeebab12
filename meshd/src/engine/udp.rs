//! The one UDP socket of the engine: dual-stack where the host allows it.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
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

    /// Receives a datagram; IPv4-mapped sources come back as plain IPv4.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf).await?;
        let from = match from.ip() {
            IpAddr::V6(v6) => SocketAddr::new(v6.to_canonical(), from.port()),
            IpAddr::V4(_) => from,
        };
        Ok((n, from))
    }
}
