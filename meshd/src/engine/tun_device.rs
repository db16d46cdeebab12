//! The TUN device: created with the `tun` crate, given the overlay addresses
//! and routes with iproute2.

use std::net::IpAddr;
use std::process::Command;

use anyhow::Context as _;
use platform::addr::IpPrefix;

/// WireGuard's usual inner MTU: 1500 minus the IPv6 + UDP + WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;

#[derive(Clone, Debug)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u16,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        anyhow::bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates the device, assigns `addresses` and routes `routes` through it.
pub fn create(
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
    // IPv6 may be disabled on the host: the mesh still works over IPv4.
    let v6_optional = |r: anyhow::Result<()>, is_v4: bool| match r {
        Err(e) if !is_v4 => {
            tracing::warn!(error = %e, "IPv6 overlay unavailable");
            Ok(())
        }
        other => other,
    };
    for addr in addresses {
        let host = IpPrefix::host(*addr).to_string();
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        v6_optional(
            ip(&[family, "addr", "add", &host, "dev", &cfg.name]),
            addr.is_ipv4(),
        )?;
    }
    for route in routes {
        let family = if route.addr.is_ipv4() { "-4" } else { "-6" };
        let net = route.network().to_string();
        v6_optional(
            ip(&[family, "route", "replace", &net, "dev", &cfg.name]),
            route.addr.is_ipv4(),
        )?;
    }
    Ok(device)
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
