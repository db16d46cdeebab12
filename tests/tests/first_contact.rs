//! First contact and engine lifetimes, in network namespaces: right after
//! `meshd up`, the very first one-second ping between two devices is
//! answered, with no warm-up and no retry, on a LAN and through a relay;
//! and `meshd down` releases the engine's UDP port and TUN device even
//! while a `meshd ping -c N` whose CLI has gone is still running, so the
//! next `up` starts a new engine. Needs root; run serially.
//!
//! Each ping is one `ping -c 1 -W 1`, sent the moment `up` returns: no
//! warm-up, no retry. Behind NAT, alpha is already up and on its relay
//! (as a device someone joins a network to reach would be).

use std::time::{Duration, Instant};

use crank_e2e::{bin, run_lab, wait_until, Coordinator, Device, Lab, Nat};

/// One `ping -c 1 -W 1` from `from` to `to`'s IPv4 overlay address: the
/// first packet must cross within a second. On failure it shows what both
/// engines saw.
fn first_ping(from: &Device, to: &Device, what: &str) -> anyhow::Result<()> {
    let (target, _) = to.overlay()?;
    let started = Instant::now();
    if from.host.ping(&target) {
        return Ok(());
    }
    let elapsed = started.elapsed();
    let seen = |d: &Device| d.status().map(|s| s.to_string()).unwrap_or_default();
    anyhow::bail!(
        "{what}: the first ping from {} to {target} went unanswered ({elapsed:?})\n{}: {}\n{}: {}",
        from.host.name,
        from.host.name,
        seen(from),
        to.host.name,
        seen(to),
    )
}

/// Waits until `dev` lists a peer called `name` (it knows of it; nothing
/// about a session).
fn wait_listed(dev: &Device, name: &str) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(10),
        &format!("{} lists {name}", dev.host.name),
        || dev.peer(name).is_ok_and(|p| p.is_some()),
    )
}

#[test]
fn first_ping_after_up_is_answered_on_a_lan() {
    run_lab(lan);
}

fn lan(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "home")?;
    let alpha_host = lab.host("alpha", 11)?;
    let alpha = Device::start(lab, alpha_host)?;
    alpha.up(&coord)?;

    // Newcomers, each pinging at once after its `up` returns, and
    // being pinged by alpha as soon as alpha has heard of it.
    for (i, name) in ["beta", "gamma"].iter().enumerate() {
        let host = lab.host(name, 12 + i as u8)?;
        let dev = Device::start(lab, host)?;
        dev.up(&coord)?;
        first_ping(&dev, &alpha, &format!("{name} → alpha on a LAN"))?;

        let next = lab.host(&format!("{name}2"), 22 + i as u8)?;
        let late = Device::start(lab, next)?;
        late.up(&coord)?;
        wait_listed(&alpha, &late.host.name)?;
        first_ping(
            &alpha,
            &late,
            &format!("alpha → {} on a LAN", late.host.name),
        )?;
    }
    Ok(())
}

#[test]
fn first_ping_after_up_is_answered_behind_two_home_nats() {
    run_lab(behind_nats);
}

/// Two devices behind separate masquerading routers that drop unsolicited
/// packets: the first packets can only go through the relay.
fn behind_nats(lab: &mut Lab) -> anyhow::Result<()> {
    let (coord, _relay) = lab.coordinator_and_relay()?;
    let (_ra, a) = lab.host_behind_nat("alpha", 21, Nat::EndpointIndependent)?;
    let alpha = Device::start(lab, a)?;
    alpha.up(&coord)?;
    alpha.wait_home_relay()?;
    for (i, name) in ["beta", "gamma"].iter().enumerate() {
        let (_r, h) = lab.host_behind_nat(name, 22 + i as u8, Nat::EndpointIndependent)?;
        let dev = Device::start(lab, h)?;
        dev.up(&coord)?;
        first_ping(&dev, &alpha, &format!("{name} → alpha, both behind NAT"))?;
    }
    Ok(())
}

#[test]
fn first_ping_after_up_is_answered_through_a_relay_and_down_up_rebinds() {
    run_lab(relayed);
}

fn relayed(lab: &mut Lab) -> anyhow::Result<()> {
    let (coord, _relay) = lab.coordinator_and_relay()?;

    let alpha_host = lab.host("alpha", 11)?;
    let beta_host = lab.host("beta", 12)?;
    alpha_host.block_udp_with(&beta_host)?;
    let alpha = Device::start(lab, alpha_host)?;
    let beta = Device::start(lab, beta_host)?;
    alpha.up(&coord)?;
    alpha.wait_home_relay()?;

    for round in 0..3 {
        beta.up(&coord)?;
        first_ping(
            &beta,
            &alpha,
            &format!("round {round}: beta → alpha via the relay"),
        )?;

        // A long `meshd ping` (relayed answers never stop it early) whose
        // CLI is killed after a second: the daemon's ping outlives it.
        let meshd = bin("meshd");
        let _ = beta.host.run(
            "timeout",
            &[
                "1",
                meshd.to_str().unwrap_or("meshd"),
                "--socket",
                &beta.socket,
                "ping",
                "-c",
                "50",
                "alpha",
            ],
        );
        // `down` must take the engine's port and TUN device with it ...
        beta.meshd(&["down"])?;
        let links = beta.host.run("ip", &["-o", "link", "show"])?;
        anyhow::ensure!(
            !links.contains(" mesh0:"),
            "round {round}: TUN device left after down:\n{links}"
        );
        // ... so that `up` (next round) binds the same port again.
    }
    beta.up(&coord)?;
    first_ping(&beta, &alpha, "after the last down/up")?;
    let st = beta.status()?;
    anyhow::ensure!(
        st["self"]["udp_port"] == 41641,
        "beta did not get its port back: {}",
        st["self"]
    );
    Ok(())
}
