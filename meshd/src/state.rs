//! What the daemon keeps in its state directory: its keys (0600, generated on
//! first start, never sent anywhere but as public keys), its preferences and
//! its compute settings.
//! The disco key is not kept: each start makes a new one, which is how peers
//! learn that this device restarted and its old WireGuard sessions are gone.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use platform::keys::{DevicePrivate, DiscoPrivate, NodePrivate};
use serde::{Deserialize, Serialize};

use crate::contribute::ComputeSettings;

const KEYS_FILE: &str = "keys.json";
const PREFS_FILE: &str = "prefs.json";
const COMPUTE_FILE: &str = "compute.json";

pub struct Keys {
    pub node: NodePrivate,
    pub disco: DiscoPrivate,
    pub device: DevicePrivate,
}

#[derive(Serialize, Deserialize)]
struct KeysFile {
    node: String,
    device: String,
}

/// Choices that survive a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefs {
    /// Coordinator this device is registered with.
    pub coordinator: Option<String>,
    pub hostname: Option<String>,
    /// `meshd up` was the last word (not `down`): reconnect on start.
    pub wants_up: bool,
}

/// Writes `contents` to `path` atomically (temp file + rename) with `mode`.
fn write_private(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

pub struct StateDir(PathBuf);

impl StateDir {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(path)
            .with_context(|| format!("creating state dir {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        Ok(StateDir(path.to_owned()))
    }

    /// Loads the keys, generating and storing them on first use.
    pub fn keys(&self) -> anyhow::Result<Keys> {
        let path = self.0.join(KEYS_FILE);
        if path.exists() {
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let f: KeysFile = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            let bad = |what: &str| format!("{} holds an invalid {what} key", path.display());
            return Ok(Keys {
                node: f.node.parse().with_context(|| bad("node"))?,
                disco: DiscoPrivate::generate(),
                device: f.device.parse().with_context(|| bad("device"))?,
            });
        }
        let keys = Keys {
            node: NodePrivate::generate(),
            disco: DiscoPrivate::generate(),
            device: DevicePrivate::generate(),
        };
        let f = KeysFile {
            node: keys.node.to_secret_text(),
            device: keys.device.to_secret_text(),
        };
        write_private(&path, serde_json::to_string_pretty(&f)?.as_bytes(), 0o600)?;
        tracing::info!(node = %keys.node.public().short(), "generated device keys");
        Ok(keys)
    }

    /// A JSON file of the state dir, or its default when there is none.
    fn load<T: Default + serde::de::DeserializeOwned>(&self, name: &str) -> anyhow::Result<T> {
        let path = self.0.join(name);
        if !path.exists() {
            return Ok(T::default());
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn save<T: Serialize>(&self, name: &str, value: &T) -> anyhow::Result<()> {
        write_private(
            &self.0.join(name),
            serde_json::to_string_pretty(value)?.as_bytes(),
            0o600,
        )
    }

    pub fn prefs(&self) -> anyhow::Result<Prefs> {
        self.load(PREFS_FILE)
    }

    pub fn save_prefs(&self, prefs: &Prefs) -> anyhow::Result<()> {
        self.save(PREFS_FILE, prefs)
    }

    /// The daemon's compute configuration (`compute.json`).
    pub fn compute_settings(&self) -> anyhow::Result<ComputeSettings> {
        self.load(COMPUTE_FILE)
    }

    pub fn save_compute_settings(&self, settings: &ComputeSettings) -> anyhow::Result<()> {
        self.save(COMPUTE_FILE, settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_generated_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let first = state.keys().unwrap();
        let again = state.keys().unwrap();
        assert_eq!(first.node.public(), again.node.public());
        assert_eq!(first.device.public(), again.device.public());
        assert_ne!(
            first.disco.public(),
            again.disco.public(),
            "disco key is per start"
        );
        let mode = fs::metadata(dir.path().join(KEYS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn prefs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.prefs().unwrap(), Prefs::default());
        let p = Prefs {
            coordinator: Some("http://c:8080".into()),
            hostname: None,
            wants_up: true,
        };
        state.save_prefs(&p).unwrap();
        assert_eq!(state.prefs().unwrap(), p);
    }
}
