//! The access policy and MagicDNS between real devices in namespaces.
//!
//! Policy: a rule lets alpha reach beta on port 8000 only; alpha's HTTP
//! request to beta:8000 is answered, one to beta:9000 is dropped by beta's
//! engine and counted there, beta cannot open a connection to alpha, and
//! a policy change lets 9000 through live, without restarting anything.
//!
//! Names: `dig @100.100.100.100 beta.home.crank.internal` answers, `ping
//! beta` and `curl http://beta:8000` work through the search domain, a
//! split-DNS domain is answered by its own server in another namespace,
//! other names are forwarded to the resolver the namespace had, and that
//! resolv.conf comes back byte for byte on `meshd down`, also after the
//! daemon was killed with it installed and started again.
//!
//! Visibility: a member's device made a guest's vanishes from its peers'
//! netmaps and sees none; a rule for guests gives it exactly one peer and
//! port. Needs root.

use std::time::Duration;

use crank_e2e::{
    bin, netns_etc, run_lab, serve_http, wait_until, Coordinator, Device, Host, Lab, LAB_RESOLVER,
};

/// Starts an `overlay-httpd` on `addr:port` in `host`.
fn httpd(lab: &mut Lab, host: &Host, addr: &str, port: u16) -> anyhow::Result<()> {
    lab.spawn(
        host,
        &bin("overlay-httpd"),
        &[&format!("{addr}:{port}"), &host.name],
        &format!("httpd-{}-{port}.log", host.name),
    )?;
    host.wait_tcp(addr, port, Duration::from_secs(5))
}

/// Whether `from` gets an HTTP answer from `url` within two seconds.
fn answers(from: &Host, url: &str) -> bool {
    from.succeeds("curl", &["-sS", "-o", "/dev/null", "--max-time", "2", url])
}

/// Only alpha (the admin's) reaches beta: TCP on `ports`, and ping when
/// `ping`.
fn policy(b4: &str, b6: &str, ports: &str, ping: bool) -> String {
    let icmp = if ping {
        r#"{ "src": ["admin"], "dst": ["beta4:*"], "proto": "icmp" },"#
    } else {
        ""
    };
    format!(
        r#"// Only alpha reaches beta, on {ports}.
{{
  "hosts": {{ "beta4": "{b4}", "beta6": "{b6}" }},
  "acls": [
    {{ "src": ["admin"], "dst": ["beta4:{ports}", "beta6:{ports}"], "proto": "tcp" }},
    {icmp}
  ],
}}"#
    )
}

fn dig(from: &Host, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["+short", "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    Ok(from.run("dig", &all)?.trim().to_owned())
}

#[test]
fn a_rule_admits_one_port_and_names_resolve() {
    run_lab(|lab| {
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host, "home")?;
        let (a, b) = (lab.host("alpha", 11)?, lab.host("beta", 12)?);
        // The resolver alpha's namespace had, and a company's split domain.
        let upstream = lab.host("upstream", 53)?;
        assert_eq!(upstream.addr.to_string(), LAB_RESOLVER);
        let corp = lab.host("corp", 54)?;
        lab.spawn(
            &upstream,
            &bin("zone-server"),
            &[
                &format!("{LAB_RESOLVER}:53"),
                "example.net",
                "www=192.0.2.80",
            ],
            "upstream-dns.log",
        )?;
        lab.spawn(
            &corp,
            &bin("zone-server"),
            &["10.99.0.54:53", "corp.example", "wiki=10.1.2.3"],
            "corp-dns.log",
        )?;
        let resolv = netns_etc(&a.ns).join("resolv.conf");
        let original = std::fs::read(&resolv)?;

        let mut alpha = Device::start(lab, a.clone())?;
        let beta = Device::start(lab, b.clone())?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        let (a4, _) = alpha.overlay()?;
        let (b4, b6) = beta.overlay()?;
        wait_until(Duration::from_secs(20), "alpha and beta peers", || {
            alpha.peer("beta").ok().flatten().is_some()
                && beta.peer("alpha").ok().flatten().is_some()
        })?;
        httpd(lab, &b, &b4, 9000)?;
        let allowed = serve_http(lab, &b, &b4)?;
        httpd(lab, &a, &a4, 8000)?;
        // The default policy: members reach everything.
        assert!(answers(&a, &format!("http://{b4}:9000/")));

        coord.api(
            "PUT",
            "/api/v1/networks/home/policy",
            Some(&policy(&b4, &b6, "8000", false)),
        )?;
        let denied = format!("http://{b4}:9000/");
        wait_until(Duration::from_secs(10), "the new filter on beta", || {
            !answers(&a, &denied)
        })?;
        assert!(answers(&a, &allowed), "alpha → beta:8000 is allowed");
        assert!(
            !answers(&b, &format!("http://{a4}:8000/")),
            "beta may only answer alpha"
        );
        let counters = beta.status()?["counters"].clone();
        assert!(
            counters["drop_filter_no_rule"].as_u64() > Some(0),
            "beta counts what it dropped: {counters}"
        );
        let alpha_counters = alpha.status()?["counters"].clone();
        assert!(
            alpha_counters["drop_filter_no_rule"].as_u64() > Some(0),
            "alpha dropped beta's SYN: {alpha_counters}"
        );
        let whois = alpha.meshd(&["whois", &b4])?;
        assert!(
            whois.contains("beta.home.crank.internal") && whois.contains("owner: admin"),
            "{whois}"
        );

        assert!(
            !a.succeeds("ping", &["-c", "1", "-W", "1", &b4]),
            "no rule allows ping yet"
        );
        // A live change: 9000 and ping too, no restart.
        coord.api(
            "PUT",
            "/api/v1/networks/home/policy",
            Some(&policy(&b4, &b6, "8000,9000", true)),
        )?;
        wait_until(Duration::from_secs(10), "beta:9000 allowed", || {
            answers(&a, &denied)
        })?;

        // Names.
        wait_until(Duration::from_secs(10), "MagicDNS up on alpha", || {
            dig(&a, &["@100.100.100.100", "beta.home.crank.internal"]).is_ok_and(|out| out == b4)
        })?;
        assert_eq!(
            dig(
                &a,
                &["@100.100.100.100", "beta.home.crank.internal", "AAAA"]
            )?,
            b6
        );
        let ptr = dig(&a, &["@100.100.100.100", "-x", &b4])?;
        assert_eq!(ptr, "beta.home.crank.internal.");
        let nx = a.run(
            "dig",
            &[
                "+time=2",
                "+tries=1",
                "@100.100.100.100",
                "nobody.home.crank.internal",
            ],
        )?;
        assert!(nx.contains("status: NXDOMAIN"), "{nx}");
        // Through the OS resolver: the search domain makes `beta` work.
        assert!(
            a.succeeds("ping", &["-c", "1", "-W", "2", "beta"]),
            "ping beta"
        );
        assert!(answers(&a, "http://beta:8000/"), "curl http://beta:8000");
        // Forwarded to the namespace's own resolver.
        assert_eq!(
            dig(&a, &["@100.100.100.100", "www.example.net"])?,
            "192.0.2.80"
        );
        // Split DNS for corp.example, set by the admin.
        coord.api(
            "PUT",
            "/api/v1/networks/home/dns",
            Some(r#"{"split": {"corp.example": ["10.99.0.54:53"]}}"#),
        )?;
        wait_until(Duration::from_secs(10), "split DNS", || {
            dig(&a, &["@100.100.100.100", "wiki.corp.example"]).is_ok_and(|out| out == "10.1.2.3")
        })?;
        // Nobody but the device itself reaches its MagicDNS: a host on the
        // LAN routing the service address to alpha gets no answer.
        upstream.run(
            "ip",
            &[
                "route",
                "add",
                "100.100.100.100/32",
                "via",
                &a.addr.to_string(),
            ],
        )?;
        let stranger =
            dig(&upstream, &["@100.100.100.100", "beta.home.crank.internal"]).unwrap_or_default();
        assert!(
            !stranger.contains(&b4),
            "a stranger was answered: {stranger}"
        );
        let status = alpha.status()?;
        assert_eq!(
            status["dns"]["zone"], "home.crank.internal",
            "{}",
            status["dns"]
        );

        // Down: the resolver settings come back as they were.
        assert_ne!(
            std::fs::read(&resolv)?,
            original,
            "MagicDNS rewrote resolv.conf"
        );
        // A crash leaves ours in place; the next start puts the original
        // back and installs again, never taking ours for the original.
        lab.kill(alpha.pid);
        let crashed = std::fs::read_to_string(&resolv)?;
        assert!(crashed.starts_with("# written by meshd"), "{crashed}");
        alpha.restart(lab)?;
        wait_until(Duration::from_secs(20), "MagicDNS back on alpha", || {
            dig(&a, &["@100.100.100.100", "beta.home.crank.internal"]).is_ok_and(|out| out == b4)
        })?;
        alpha.meshd(&["down"])?;
        assert_eq!(
            std::fs::read(&resolv)?,
            original,
            "resolv.conf restored on down, after a crash and a restart"
        );
        Ok(())
    });
}

/// A curl to the coordinator's API as the holder of `token`.
fn api_as(
    coord: &Coordinator,
    token: &str,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<serde_json::Value> {
    let auth = format!("authorization: Bearer {token}");
    let url = format!("{}{path}", coord.url);
    let mut args = vec![
        "-sS",
        "--fail-with-body",
        "-X",
        method,
        "-H",
        "content-type: application/json",
        "--data",
        body,
        &url,
    ];
    // An invite is redeemed without a token.
    if !token.is_empty() {
        args.extend(["-H", &auth]);
    }
    let out = coord.host.run("curl", &args)?;
    Ok(serde_json::from_str(&out)?)
}

#[test]
fn a_guest_device_sees_only_what_a_rule_gives_it() {
    run_lab(|lab| {
        let coord_host = lab.host("coord", 1)?;
        let coord = Coordinator::start(lab, coord_host, "home")?;
        let (a, b, g) = (
            lab.host("alpha", 11)?,
            lab.host("beta", 12)?,
            lab.host("gamma", 13)?,
        );
        // carl joins as a member, adds gamma, and is then made a guest.
        let invite = coord.api(
            "POST",
            "/api/v1/networks/home/invites",
            Some(r#"{"role": "member"}"#),
        )?;
        let secret = invite["secret"].as_str().unwrap_or_default().to_owned();
        let redeemed = api_as(
            &coord,
            "",
            "POST",
            &format!("/api/v1/invites/{secret}/redeem"),
            r#"{"username": "carl"}"#,
        )?;
        let carl = redeemed["token"].as_str().unwrap_or_default().to_owned();
        coord.api("POST", "/api/v1/networks/home/members/carl/approve", None)?;
        let key = api_as(
            &coord,
            &carl,
            "POST",
            "/api/v1/networks/home/preauth-keys",
            "{}",
        )?["key"]
            .as_str()
            .unwrap_or_default()
            .to_owned();

        let alpha = Device::start(lab, a)?;
        let beta = Device::start(lab, b.clone())?;
        let gamma = Device::start(lab, g.clone())?;
        alpha.up(&coord)?;
        beta.up(&coord)?;
        gamma.meshd(&[
            "up",
            "--coordinator",
            &coord.url,
            "--auth-key",
            &key,
            "--hostname",
            "gamma",
        ])?;
        let (b4, b6) = beta.overlay()?;
        wait_until(
            Duration::from_secs(20),
            "gamma sees both as a member",
            || {
                gamma
                    .status()
                    .is_ok_and(|s| s["peers"].as_array().is_some_and(|p| p.len() == 2))
            },
        )?;
        coord.api(
            "PUT",
            "/api/v1/networks/home/members/carl/role",
            Some(r#"{"role": "guest"}"#),
        )?;
        wait_until(Duration::from_secs(10), "a guest sees nobody", || {
            gamma
                .status()
                .is_ok_and(|s| s["peers"].as_array().is_some_and(Vec::is_empty))
                && alpha.peer("gamma").is_ok_and(|p| p.is_none())
        })?;
        // One rule for guests: beta's port 8000.
        let text = format!(
            r#"{{"hosts": {{"beta4": "{b4}", "beta6": "{b6}"}},
              "acls": [
                {{"src": ["autogroup:member"], "dst": ["autogroup:member:*"]}},
                {{"src": ["autogroup:guest"], "dst": ["beta4:8000", "beta6:8000"]}},
              ]}}"#
        );
        coord.api("PUT", "/api/v1/networks/home/policy", Some(&text))?;
        wait_until(Duration::from_secs(10), "the guest sees beta only", || {
            gamma.status().is_ok_and(|s| {
                s["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 1 && p[0]["name"] == "beta")
            })
        })?;
        let url = serve_http(lab, &b, &b4)?;
        assert!(answers(&g, &url), "the guest reaches beta:8000");
        assert!(
            alpha.peer("gamma")?.is_none(),
            "alpha never learns of the guest"
        );
        Ok(())
    });
}
