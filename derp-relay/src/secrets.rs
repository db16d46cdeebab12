//! The relay's secret files: its private key (made on first start), the
//! coordinator token and the mesh pre-shared key.
//!
//! A secret file must be readable by its owner only: one that group or
//! others can read is refused rather than used, since whoever else read it
//! can already impersonate the relay. The key is written atomically (a
//! private temporary file, synced, renamed over the name, the directory
//! synced), so a crash never leaves a half-written key that a restart would
//! either refuse or, worse, replace with a new identity.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{ensure, Context as _};
use x25519_dalek::StaticSecret;

/// Reads a secret file, refusing it when group or others may read or write it.
pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mode = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    ensure!(
        mode & 0o077 == 0,
        "{} is open to group or others (mode {:o}); make it owner-only: chmod 600 {}",
        path.display(),
        mode & 0o777,
        path.display()
    );
    std::io::read_to_string(file).with_context(|| format!("reading {}", path.display()))
}

/// The relay key in `path`, or a new one written there when there is none.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<StaticSecret> {
    if path.exists() {
        let text = read_secret(path)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .with_context(|| format!("{} is not a hex key", path.display()))?;
        return Ok(StaticSecret::from(bytes));
    }
    let key = StaticSecret::random_from_rng(rand_core::OsRng);
    write_atomically(path, hex::encode(key.to_bytes()).as_bytes())?;
    Ok(key)
}

/// Writes `contents` to `path` (mode 0600) so that `path` holds either
/// nothing or all of it, across crashes and power loss.
pub fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is.
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_new_key_is_owner_only_complete_and_kept() {
        let d = dir();
        let path = d.path().join("sub").join("key");
        let made = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 64);
        let again = load_or_create_key(&path).unwrap();
        assert_eq!(made.to_bytes(), again.to_bytes(), "the same identity");
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key")]);
    }

    #[test]
    fn an_interrupted_earlier_write_does_not_break_the_next() {
        let d = dir();
        let path = d.path().join("key");
        // A temporary left behind by a crash between write and rename.
        let stale = d.path().join(format!(".key.tmp-{}", std::process::id()));
        std::fs::write(&stale, "half").unwrap();
        load_or_create_key(&path).unwrap();
        assert!(!stale.exists(), "renamed over, not left behind");
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 64);
    }

    #[test]
    fn secrets_readable_by_others_are_refused() {
        let d = dir();
        let path = d.path().join("psk");
        std::fs::write(&path, "region-psk-0123456789").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_secret(&path).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "region-psk-0123456789");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_secret(&path).is_ok());
        // A key file others can read is refused too, not silently used.
        let key = d.path().join("key");
        load_or_create_key(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create_key(&key).is_err());
    }
}
