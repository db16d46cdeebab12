//! The TUN device: created with the `tun` crate, given the overlay addresses
//! and routes over rtnetlink, with offloads on where the kernel has them.
//!
//! A leaf module with `unsafe`: the `TUNSETOFFLOAD` ioctl, which the `tun`
//! crate does not offer.
#![allow(unsafe_code)]

use std::net::IpAddr;

use anyhow::Context as _;
use futures_util::TryStreamExt as _;
use platform::addr::IpPrefix;

use super::offload::Offloads;

/// WireGuard's usual inner MTU: 1500 minus the IPv6 + UDP + WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Clone, Debug)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u16,
    /// Ask for the kernel's TUN offloads (virtio-net headers, checksum,
    /// TSO/USO); off, every packet is read and written plain.
    pub offloads: bool,
    /// A TUN file descriptor the host opened and configured (a mobile VPN
    /// extension's, or an embedding app's): used as it is, never closed
    /// here, and its addresses and routes are left to the host.
    pub host_fd: Option<std::os::fd::RawFd>,
}

impl TunConfig {
    /// A device this process creates and configures.
    pub fn named(name: impl Into<String>, mtu: u16, offloads: bool) -> Self {
        TunConfig {
            name: name.into(),
            mtu,
            offloads,
            host_fd: None,
        }
    }

    /// Whether the host, not meshd, owns and configures the device.
    pub fn host_managed(&self) -> bool {
        self.host_fd.is_some()
    }
}

/// Creates the device, assigns `addresses` and routes `routes` through it,
/// over rtnetlink (no `ip` subprocess).
pub async fn create(
    cfg: &TunConfig,
    addresses: &[IpAddr],
    routes: &[IpPrefix],
) -> anyhow::Result<(::tun::AsyncDevice, Offloads)> {
    if let Some(fd) = cfg.host_fd {
        let mut config = ::tun::Configuration::default();
        config.raw_fd(fd).close_fd_on_drop(false).mtu(cfg.mtu);
        let device = ::tun::create_as_async(&config)
            .with_context(|| format!("using the host's TUN file descriptor {fd}"))?;
        tracing::info!(
            fd,
            "TUN device from the host; its addresses and routes are the host's"
        );
        return Ok((device, Offloads::default()));
    }
    let mut config = ::tun::Configuration::default();
    config.tun_name(&cfg.name).mtu(cfg.mtu).up();
    if cfg.offloads {
        config.platform_config(|p| {
            p.vnet_hdr(true);
        });
    }
    let device = ::tun::create_as_async(&config).with_context(|| {
        format!(
            "creating TUN device {} (needs root or CAP_NET_ADMIN)",
            cfg.name
        )
    })?;
    let offloads = if cfg.offloads {
        use std::os::fd::AsRawFd as _;
        enable_offloads(device.as_raw_fd())
    } else {
        Offloads::default()
    };
    tracing::info!(?offloads, tun = %cfg.name, "TUN offloads");
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let conn = tokio::spawn(connection);
    let result = configure(&handle, cfg, addresses, routes).await;
    conn.abort();
    result?;
    Ok((device, offloads))
}

/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

fn set_offload(fd: std::os::fd::RawFd, flags: libc::c_uint) -> bool {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; `fd` is the open TUN
    // device. A kernel without some flag answers EINVAL and changes nothing.
    unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, libc::c_ulong::from(flags)) == 0 }
}

/// Turns on what the kernel offers, most first: checksums plus TCP and UDP
/// segmentation, else without UDP (before Linux 6.2), else checksums only.
/// Packets carry the virtio-net header whatever this finds.
fn enable_offloads(fd: std::os::fd::RawFd) -> Offloads {
    let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    let on = |checksum, tso, uso| Offloads {
        vnet_hdr: true,
        checksum,
        tso,
        uso,
    };
    if set_offload(fd, tso | TUN_F_USO4 | TUN_F_USO6) {
        on(true, true, true)
    } else if set_offload(fd, tso) {
        on(true, true, false)
    } else if set_offload(fd, TUN_F_CSUM) {
        on(true, false, false)
    } else {
        on(false, false, false)
    }
}

/// IPv6 may be disabled on the host: the mesh still works over IPv4.
fn v6_optional(r: anyhow::Result<()>, is_v4: bool) -> anyhow::Result<()> {
    match r {
        Err(e) if !is_v4 => {
            tracing::warn!(error = format!("{e:#}"), "IPv6 overlay unavailable");
            Ok(())
        }
        other => other,
    }
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> anyhow::Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("looking up {name}"))?
        .with_context(|| format!("{name} is gone"))?;
    Ok(link.header.index)
}

async fn add_host_addresses(
    handle: &rtnetlink::Handle,
    name: &str,
    index: u32,
    addresses: &[IpAddr],
) -> anyhow::Result<()> {
    for addr in addresses {
        let host = IpPrefix::host(*addr);
        let added = handle
            .address()
            .add(index, host.addr, host.len)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding {host} to {name}"));
        v6_optional(added, addr.is_ipv4())?;
    }
    Ok(())
}

/// Adds host addresses to an existing device (the MagicDNS service
/// addresses): they go with the device.
pub async fn add_addresses(name: &str, addresses: &[IpAddr]) -> anyhow::Result<()> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let conn = tokio::spawn(connection);
    let result = async {
        let index = link_index(&handle, name).await?;
        add_host_addresses(&handle, name, index, addresses).await
    }
    .await;
    conn.abort();
    result
}

async fn configure(
    handle: &rtnetlink::Handle,
    cfg: &TunConfig,
    addresses: &[IpAddr],
    routes: &[IpPrefix],
) -> anyhow::Result<()> {
    let index = link_index(handle, &cfg.name).await?;
    add_host_addresses(handle, &cfg.name, index, addresses).await?;
    for route in routes {
        let net = route.network();
        let message = match net.addr {
            IpAddr::V4(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, net.len)
                .output_interface(index)
                .build(),
            IpAddr::V6(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, net.len)
                .output_interface(index)
                .build(),
        };
        let added = handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .with_context(|| format!("routing {net} through {}", cfg.name));
        v6_optional(added, net.addr.is_ipv4())?;
    }
    Ok(())
}

/// Waits (up to `limit`) until the kernel has removed the device `name`.
/// Closing a TUN device's last descriptor unregisters it, but the removal
/// finishes a moment later; whoever closed it and promised it gone (`meshd
/// down`) waits here. Returns whether it is gone.
pub async fn wait_gone(name: &str, limit: std::time::Duration) -> bool {
    let path = std::path::Path::new("/sys/class/net").join(name);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
