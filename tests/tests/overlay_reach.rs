//! Reachable only where it should be: a device's overlay addresses take
//! packets through the tunnel and nowhere else. A plain host on the same
//! LAN, routing the overlay range via the worker's LAN address, gets no
//! answer from the compute API (or anything else on the overlay address),
//! while a peer through the tunnel and the worker's own gateway still do;
//! the worker's nftables table survives a crash as one table and goes with
//! `meshd down` and with the daemon. Needs root and the embedding model.

use std::time::Duration;

use crank_e2e::{models_dir, run_lab, serve_http, wait_until, Coordinator, Device, Host};
use serde_json::json;

const GATEWAY: &str = "http://127.0.0.1:8420";

/// Whether `from` gets any HTTP answer from `url` within two seconds.
fn answers(from: &Host, url: &str) -> bool {
    from.succeeds("curl", &["-sS", "-o", "/dev/null", "--max-time", "2", url])
}

/// How many `crank_mesh` tables `host` has.
fn tables(host: &Host) -> anyhow::Result<usize> {
    let out = host.run("nft", &["list", "tables"])?;
    Ok(out
        .lines()
        .filter(|l| l.trim() == "table inet crank_mesh")
        .count())
}

#[test]
fn the_overlay_answers_through_the_tunnel_only() {
    run_lab(|lab| {
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host, "home")?;
        let a = lab.host("alpha", 11)?;
        let b = lab.host("beta", 12)?;
        let stranger = lab.host("stranger", 13)?;
        let alpha = Device::start(lab, a)?;
        let models = models_dir();
        let mut beta = Device::start_with(
            lab,
            b,
            &[
                "--compute",
                "--models-dir",
                &models,
                "--model",
                "all-minilm-l6-v2",
                "--mode",
                "always",
                "--max-celsius",
                "150",
            ],
        )?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let (b4, b6) = beta.overlay()?;
        let compute = format!("http://{b4}:8421/v1/models");
        wait_until(
            Duration::from_secs(60),
            "alpha reaching beta's compute API",
            || {
                alpha
                    .host
                    .http("GET", &compute, &[], None)
                    .is_ok_and(|r| r.status == 200)
            },
        )?;
        // Something on the overlay address that is not bound to the TUN:
        // only the firewall table keeps the stranger from it.
        let httpd = serve_http(lab, &beta.host, &b4)?;
        anyhow::ensure!(answers(&alpha.host, &httpd), "alpha to beta's httpd");

        // The stranger: same LAN, no meshd, one route.
        let via = beta.host.addr.to_string();
        stranger.run("ip", &["route", "add", "100.64.0.0/10", "via", &via])?;
        anyhow::ensure!(
            stranger.succeeds("ping", &["-c", "1", "-W", "1", &via]),
            "the stranger reaches beta on the LAN"
        );
        let blocked = |what: &str| -> anyhow::Result<()> {
            anyhow::ensure!(
                !answers(&stranger, &compute),
                "{what}: compute API answered the stranger"
            );
            anyhow::ensure!(
                !answers(&stranger, &httpd),
                "{what}: httpd answered the stranger"
            );
            anyhow::ensure!(
                !stranger.ping(&b4),
                "{what}: overlay address answered a ping"
            );
            Ok(())
        };
        blocked("up")?;
        let table = beta
            .host
            .run("nft", &["list", "table", "inet", "crank_mesh"])?;
        anyhow::ensure!(
            table.contains(&b4) && table.contains(&b6),
            "both overlay addresses guarded: {table}"
        );
        let st = beta.status()?;
        anyhow::ensure!(st["self"].get("firewall_warning").is_none(), "{st}");

        // The peer through the tunnel still gets its answers, and beta's own
        // gateway places a job on beta itself (local traffic to the TUN's
        // address is accepted by the socket bound to the TUN).
        let r = alpha.host.http("GET", &compute, &[], None)?;
        anyhow::ensure!(r.status == 200, "alpha after the stranger: {}", r.status);
        let body = json!({"model": "all-minilm-l6-v2", "input": "hello"});
        let (status, v) = beta
            .host
            .post_json(&format!("{GATEWAY}/v1/embeddings"), &body)?;
        anyhow::ensure!(
            status == 200 && v["served_by"] == "beta" && v["caller"] == "beta",
            "beta's own gateway: {status} {v}"
        );

        // A crash leaves the table; the next start replaces it, once.
        lab.kill(beta.pid);
        anyhow::ensure!(tables(&beta.host)? == 1, "the crashed daemon's table stays");
        beta.restart(lab)?;
        wait_until(
            Duration::from_secs(60),
            "alpha reaching beta's compute API after the crash",
            || {
                alpha
                    .host
                    .http("GET", &compute, &[], None)
                    .is_ok_and(|r| r.status == 200)
            },
        )?;
        anyhow::ensure!(tables(&beta.host)? == 1, "one table after the restart");
        blocked("after a crash")?;

        // Down: the table goes with the TUN.
        beta.meshd(&["down"])?;
        anyhow::ensure!(tables(&beta.host)? == 0, "a table after `meshd down`");
        // Up again, then the daemon stops: the table goes with it.
        beta.up(&coord)?;
        wait_until(Duration::from_secs(30), "beta's table back", || {
            tables(&beta.host).is_ok_and(|n| n == 1)
        })?;
        beta.stop(lab);
        anyhow::ensure!(tables(&beta.host)? == 0, "a table after the daemon stopped");
        Ok(())
    });
}
