//! The TUN device: created with the `tun` crate, given the overlay addresses
//! and routes over rtnetlink.

use std::net::IpAddr;

use anyhow::Context as _;
use futures_util::TryStreamExt as _;
use platform::addr::IpPrefix;

/// WireGuard's usual inner MTU: 1500 minus the IPv6 + UDP + WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Clone, Debug)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u16,
}

/// Creates the device, assigns `addresses` and routes `routes` through it,
/// over rtnetlink (no `ip` subprocess).
pub async fn create(
    cfg: &TunConfig,
    addresses: &[IpAddr],
    routes: &[IpPrefix],
) -> anyhow::Result<::tun::AsyncDevice> {
    let mut config = ::tun::Configuration::default();
    config.tun_name(&cfg.name).mtu(cfg.mtu).up();
    let device = ::tun::create_as_async(&config).with_context(|| {
        format!(
            "creating TUN device {} (needs root or CAP_NET_ADMIN)",
            cfg.name
        )
    })?;
    let (connection, handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    let conn = tokio::spawn(connection);
    let result = configure(&handle, cfg, addresses, routes).await;
    conn.abort();
    result?;
    Ok(device)
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
