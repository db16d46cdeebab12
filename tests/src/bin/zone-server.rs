//! An authoritative DNS server for namespace tests, standing in for a
//! company's resolver or an upstream: `zone-server LISTEN DOMAIN
//! NAME=ADDRESS…` answers A/AAAA for `NAME.DOMAIN` (NXDOMAIN for the rest
//! of DOMAIN, REFUSED elsewhere) over UDP and TCP until it is killed. It
//! is MagicDNS's own server given one static zone and no upstream.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use meshd::dns::{Config, Host, MagicDns, ZoneSpec};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, domain, names @ ..] = args.as_slice() else {
        anyhow::bail!("usage: zone-server LISTEN DOMAIN NAME=ADDRESS…");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN is IP:PORT")?;
    let hosts = names
        .iter()
        .map(|n| {
            let (name, addr) = n.split_once('=').context("NAME=ADDRESS")?;
            let addr: IpAddr = addr.parse().context("ADDRESS")?;
            Ok(Host {
                name: name.to_owned(),
                addrs: vec![addr],
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = Config {
        zone: ZoneSpec {
            domain: domain.clone(),
            hosts,
            extra: Vec::new(),
            ttl: 5,
            reverse_ranges: Vec::new(),
        },
        split: Vec::new(),
        upstream: Vec::new(),
    };
    let _server = MagicDns::start(&[listen], config).await?;
    println!("serving {domain} on {listen}");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
