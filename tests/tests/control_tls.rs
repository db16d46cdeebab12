//! The control plane over TLS in network namespaces: a coordinator with a
//! certificate from a private CA, devices that join it with `--ca-file` and
//! reach each other, a relay that checks in with it, a restart that reconnects with the CA kept in prefs,
//! a device without the CA that is turned away with a certificate error,
//! and devices that trust only the coordinator key they pinned: told
//! another key, or facing another coordinator with a valid certificate for
//! the same address, they refuse. Needs root; run serially (`--test-threads=1`).

use std::time::Duration;

use crank_e2e::{run_lab, wait_until, Coordinator, Device, Lab, Relay};

#[test]
fn devices_join_a_tls_coordinator_only_with_its_ca() {
    run_lab(scenario);
}

fn scenario(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let mut coord = Coordinator::start_tls(lab, coord_host, "home")?;
    anyhow::ensure!(coord.url.starts_with("https://"), "{}", coord.url);
    // The admin API answers over TLS (curl with --cacert).
    let networks = coord.api("GET", "/api/v1/networks", None)?;
    anyhow::ensure!(
        networks.to_string().contains("\"home\""),
        "networks: {networks}"
    );

    let alpha_host = lab.host("alpha", 11)?;
    let mut alpha = Device::start(lab, alpha_host)?;
    let beta_host = lab.host("beta", 12)?;
    let beta = Device::start(lab, beta_host)?;
    alpha.up(&coord)?;
    beta.up(&coord)?;
    let (a4, _) = alpha.overlay()?;
    let (b4, _) = beta.overlay()?;
    for (from, to) in [(&alpha, &b4), (&beta, &a4)] {
        wait_until(
            Duration::from_secs(10),
            &format!("{} pinging {to}", from.host.name),
            || from.host.ping(to),
        )?;
    }

    // A restarted daemon reconnects on its own: the CA file is in its prefs.
    alpha.restart(lab)?;
    wait_until(
        Duration::from_secs(20),
        "alpha back on the coordinator after a restart",
        || {
            alpha
                .status()
                .is_ok_and(|s| s["backend"] == "running" && s["coordinator_connected"] == true)
        },
    )?;
    wait_until(
        Duration::from_secs(10),
        &format!("alpha pinging {b4} after its restart"),
        || alpha.host.ping(&b4),
    )?;

    // Without the CA, `meshd up` fails on the certificate.
    let gamma_host = lab.host("gamma", 13)?;
    let gamma = Device::start(lab, gamma_host)?;
    // A relay checks devices in with the TLS coordinator (trusting its CA)
    // and holds its revocation stream open.
    let relay_host = lab.host("relay", 2)?;
    let relay = Relay::start(lab, relay_host, &coord)?;
    wait_until(
        Duration::from_secs(10),
        "the relay's revocation stream",
        || {
            relay
                .metrics()
                .is_ok_and(|m| m.lines().any(|l| l == "derp_revocation_stream_up 1"))
        },
    )?;

    let refused = gamma.meshd(&[
        "up",
        "--coordinator",
        &coord.url,
        "--auth-key",
        &coord.auth_key,
        "--hostname",
        "gamma",
    ]);
    let err = match refused {
        Ok(out) => anyhow::bail!("meshd up without the CA succeeded: {out}"),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(
        err.contains("certificate") && err.contains("--ca-file"),
        "unclear error: {err}"
    );

    // With the CA but told to trust another coordinator key: refused.
    let ca = coord
        .ca_file
        .as_ref()
        .and_then(|p| p.to_str())
        .unwrap_or_default()
        .to_owned();
    let other_key = platform::keys::CoordinatorPrivate::generate()
        .public()
        .to_string();
    let refused = gamma.meshd(&[
        "up",
        "--coordinator",
        &coord.url,
        "--ca-file",
        &ca,
        "--auth-key",
        &coord.auth_key,
        "--hostname",
        "gamma",
        "--coordinator-key",
        &other_key,
    ]);
    let err = match refused {
        Ok(out) => anyhow::bail!("meshd up trusted an unpinned coordinator: {out}"),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(err.contains(&other_key), "unclear error: {err}");

    // Someone with a valid certificate for the coordinator's address stands
    // up their own coordinator there: the devices pinned the real one's key,
    // so alpha will not join it, even with a key the impostor issued.
    let impostor = coord.impostor(lab)?;
    let refused = alpha.meshd(&[
        "up",
        "--coordinator",
        &impostor.url,
        "--ca-file",
        &ca,
        "--auth-key",
        &impostor.auth_key,
        "--hostname",
        "alpha",
    ]);
    let err = match refused {
        Ok(out) => anyhow::bail!("alpha joined an impostor coordinator: {out}"),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(
        err.contains("trusts") && err.contains("--coordinator-key"),
        "unclear error: {err}"
    );
    // And it keeps the session it had: running, with beta in its netmap.
    let st = alpha.status()?;
    anyhow::ensure!(
        st["backend"] == "running" && st["peers"].as_array().is_some_and(|p| p.len() == 1),
        "alpha lost its session: {st}"
    );
    Ok(())
}
