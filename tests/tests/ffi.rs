//! meshd as a C library, as a mobile VPN extension would use it: a C
//! program (`meshd/ffi/tests/two_instances.c`), compiled here against the
//! committed header and linked to the built `libcrank_mesh.so`, runs two
//! instances in one process, each on a TUN device the program opened. Both
//! join a real coordinator; the program then configures each TUN as a host
//! would (the instance's address, a route to the peer) and each instance
//! pings a meshd device in another namespace through its own TUN; each
//! instance's logs reach its own callback; the host's descriptors stay open
//! after the instances are freed. Needs root and a C compiler.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use crank_e2e::{bin, run_lab, Coordinator, Device, Lab};

#[test]
fn two_instances_in_one_process_each_ping_a_peer_through_their_own_tun() {
    run_lab(two_instances);
}

fn two_instances(lab: &mut Lab) -> anyhow::Result<()> {
    let coord_host = lab.host("coord", 1)?;
    let coord = Coordinator::start(lab, coord_host, "home")?;
    let peer_host = lab.host("peer", 12)?;
    let peer = Device::start(lab, peer_host)?;
    peer.up(&coord)?;
    let (peer_ip, _) = peer.overlay()?;
    let host = lab.host("app", 11)?;

    // The library sits beside the binaries the workspace build made.
    let lib_dir = bin("meshd").parent().context("binary dir")?.to_path_buf();
    anyhow::ensure!(
        lib_dir.join("libcrank_mesh.so").exists(),
        "libcrank_mesh.so not in {} (cargo build --workspace --lib)",
        lib_dir.display()
    );
    let ffi = Path::new(env!("CARGO_MANIFEST_DIR")).join("../meshd/ffi");
    let program = lab.dir.join("two_instances");
    let out = Command::new("cc")
        .args([
            "-std=c11",
            "-D_GNU_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
        ])
        .arg(&program)
        .arg(ffi.join("tests/two_instances.c"))
        .arg("-I")
        .arg(&ffi)
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lcrank_mesh")
        .output()
        .context("running cc")?;
    anyhow::ensure!(
        out.status.success(),
        "compiling against crank_mesh.h failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state = lab.dir.join("ffi-state");
    std::fs::create_dir_all(&state)?;
    let printed = host.run(
        program.to_str().context("utf-8")?,
        &[
            &coord.url,
            &coord.auth_key,
            state.to_str().context("utf-8")?,
            &peer_ip,
        ],
    )?;
    println!("{printed}");
    for line in [
        "bad configuration refused",
        "joined: ",
        "ffi-a: ping ",
        "ffi-b: ping ",
        "ok",
    ] {
        anyhow::ensure!(
            printed.lines().any(|l| l.starts_with(line)),
            "the program did not print {line:?}:\n{printed}"
        );
    }
    // Both joined the network as devices of their own.
    let devices = coord
        .api(
            "GET",
            &format!("/api/v1/networks/{}/devices", coord.network),
            None,
        )?
        .to_string();
    for name in ["ffi-a", "ffi-b"] {
        anyhow::ensure!(
            devices.contains(name),
            "{name} not on the coordinator: {devices}"
        );
    }
    Ok(())
}
