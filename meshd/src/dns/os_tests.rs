//! Tests for [`super::OsDns`] on temporary files and a fake `resolvectl`.

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const ORIGINAL: &str = "# from DHCP\nnameserver 192.168.1.1\nnameserver fe80::1%eth0\nsearch lan\n";

struct Fixture {
    _dir: tempfile::TempDir,
    os: OsDns,
    root: PathBuf,
}

fn fixture(mode: OsDnsMode) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let mut os = OsDns::new(mode);
    os.resolv_conf = root.join("resolv.conf");
    os.backup = root.join("state/resolv.conf.backup");
    os.resolvectl = root.join("no-such-resolvectl");
    os.systemctl = root.join("no-such-systemctl");
    os.resolved_run_dir = root.join("run-resolve");
    fs::write(&os.resolv_conf, ORIGINAL).expect("seed");
    Fixture {
        _dir: dir,
        os,
        root,
    }
}

fn ours() -> Vec<IpAddr> {
    vec!["100.100.100.100".parse().expect("ip")]
}

fn search() -> Vec<String> {
    vec!["home.crank.internal".into()]
}

#[test]
fn install_writes_marker_servers_search_and_backup() {
    let f = fixture(OsDnsMode::ResolvConf);
    let inode = fs::metadata(&f.os.resolv_conf).expect("meta").ino();
    let got = f.os.install("mesh0", &ours(), &search()).expect("install");
    assert_eq!(got, Installed::ResolvConf);
    let text = fs::read_to_string(&f.os.resolv_conf).expect("read");
    let first = text.lines().next().expect("first line");
    assert!(first.starts_with(MARKER));
    assert!(first.contains(&f.os.backup.display().to_string()));
    assert_eq!(nameservers(&text), ours());
    assert!(text.contains("\nsearch home.crank.internal\n"));
    assert!(text.ends_with("options edns0\n"));
    assert_eq!(fs::read_to_string(&f.os.backup).expect("backup"), ORIGINAL);
    // Written in place: same inode, so a bind-mounted file would work too.
    assert_eq!(fs::metadata(&f.os.resolv_conf).expect("meta").ino(), inode);
}

#[test]
fn install_twice_keeps_the_original_backup() {
    let f = fixture(OsDnsMode::ResolvConf);
    f.os.install("mesh0", &ours(), &search())
        .expect("install 1");
    f.os.install("mesh0", &ours(), &["other.example".to_string()])
        .expect("install 2");
    assert_eq!(fs::read_to_string(&f.os.backup).expect("backup"), ORIGINAL);
    assert!(fs::read_to_string(&f.os.resolv_conf)
        .expect("read")
        .contains("search other.example"));
}

#[test]
fn restore_is_byte_for_byte() {
    let f = fixture(OsDnsMode::ResolvConf);
    let odd = b"nameserver 10.0.0.1\n\n# trailing spaces   \r\noptions rotate".to_vec();
    fs::write(&f.os.resolv_conf, &odd).expect("seed");
    let inst = f.os.install("mesh0", &ours(), &search()).expect("install");
    f.os.restore(&inst).expect("restore");
    assert_eq!(fs::read(&f.os.resolv_conf).expect("read"), odd);
    assert!(!f.os.backup.exists(), "backup removed");
}

#[test]
fn repair_on_start_after_crash() {
    let f = fixture(OsDnsMode::ResolvConf);
    assert_eq!(f.os.repair_on_start().expect("repair"), Repair::Nothing);
    f.os.install("mesh0", &ours(), &search()).expect("install");
    // Simulated crash: no restore. A fresh start repairs.
    let fresh = f.os.clone();
    assert_eq!(fresh.repair_on_start().expect("repair"), Repair::Restored);
    assert_eq!(
        fs::read_to_string(&f.os.resolv_conf).expect("read"),
        ORIGINAL
    );
    assert!(!f.os.backup.exists());
    assert_eq!(fresh.repair_on_start().expect("repair"), Repair::Nothing);
}

#[test]
fn repair_leaves_a_file_someone_else_rewrote() {
    let f = fixture(OsDnsMode::ResolvConf);
    f.os.install("mesh0", &ours(), &search()).expect("install");
    fs::write(&f.os.resolv_conf, "nameserver 9.9.9.9\n").expect("other tool");
    assert_eq!(
        f.os.repair_on_start().expect("repair"),
        Repair::RemovedStaleBackup
    );
    assert_eq!(
        fs::read_to_string(&f.os.resolv_conf).expect("read"),
        "nameserver 9.9.9.9\n"
    );
    assert!(!f.os.backup.exists());
}

#[test]
fn previous_nameservers_excludes_ours() {
    let f = fixture(OsDnsMode::ResolvConf);
    let mut with_ours = ORIGINAL.to_string();
    with_ours.push_str("nameserver 100.100.100.100\n");
    fs::write(&f.os.resolv_conf, &with_ours).expect("seed");
    let expected: Vec<SocketAddr> = vec![
        "192.168.1.1:53".parse().expect("a"),
        "[fe80::1]:53".parse().expect("b"),
    ];
    assert_eq!(
        f.os.previous_nameservers(&ours()).expect("before"),
        expected
    );
    f.os.install("mesh0", &ours(), &search()).expect("install");
    // While installed the current file lists only us; the backup is the source.
    assert_eq!(
        f.os.previous_nameservers(&ours()).expect("during"),
        expected
    );
}

#[test]
fn symlinked_resolv_conf_is_written_through() {
    let f = fixture(OsDnsMode::ResolvConf);
    let target = f.root.join("managed-resolv.conf");
    fs::rename(&f.os.resolv_conf, &target).expect("move");
    std::os::unix::fs::symlink(&target, &f.os.resolv_conf).expect("link");
    let inst = f.os.install("mesh0", &ours(), &search()).expect("install");
    assert!(fs::symlink_metadata(&f.os.resolv_conf)
        .expect("meta")
        .file_type()
        .is_symlink());
    assert!(fs::read_to_string(&target)
        .expect("target")
        .starts_with(MARKER));
    f.os.restore(&inst).expect("restore");
    assert_eq!(fs::read_to_string(&target).expect("target"), ORIGINAL);
}

#[test]
fn rejects_injection_in_domains() {
    let f = fixture(OsDnsMode::ResolvConf);
    let evil = vec!["lan\nnameserver 6.6.6.6".to_string()];
    assert!(matches!(
        f.os.install("mesh0", &ours(), &evil),
        Err(OsDnsError::Invalid { .. })
    ));
    assert_eq!(
        fs::read_to_string(&f.os.resolv_conf).expect("read"),
        ORIGINAL
    );
}

fn fake_resolvectl(f: &mut Fixture) -> PathBuf {
    let log = f.root.join("resolvectl.log");
    let script = f.root.join("resolvectl");
    fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", log.display()),
    )
    .expect("script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    f.os.resolvectl = script;
    log
}

#[test]
fn resolved_mode_runs_resolvectl() {
    let mut f = fixture(OsDnsMode::Resolved);
    let log = fake_resolvectl(&mut f);
    f.os.routes = vec!["corp.example".into(), "64.100.in-addr.arpa".into()];
    let inst = f.os.install("mesh0", &ours(), &search()).expect("install");
    f.os.restore(&inst).expect("restore");
    let calls = fs::read_to_string(&log).expect("log");
    assert_eq!(
        calls,
        "dns mesh0 100.100.100.100\n\
         domain mesh0 home.crank.internal ~corp.example ~64.100.in-addr.arpa\n\
         default-route mesh0 false\n\
         revert mesh0\n"
    );
    assert_eq!(
        fs::read_to_string(&f.os.resolv_conf).expect("read"),
        ORIGINAL,
        "untouched"
    );
}

#[test]
fn auto_mode_detection() {
    let mut f = fixture(OsDnsMode::Auto);
    assert_eq!(
        f.os.effective_mode(),
        OsDnsMode::ResolvConf,
        "no resolved here"
    );
    fake_resolvectl(&mut f);
    fs::create_dir(&f.os.resolved_run_dir).expect("run dir");
    assert_eq!(
        f.os.effective_mode(),
        OsDnsMode::ResolvConf,
        "resolv.conf does not use it"
    );
    fs::write(&f.os.resolv_conf, "nameserver 127.0.0.53\n").expect("stub");
    assert_eq!(f.os.effective_mode(), OsDnsMode::Resolved);
}
