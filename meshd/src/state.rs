//! What the daemon keeps in its state directory: its keys (0600, generated on
//! first start, never sent anywhere but as public keys), its preferences and
//! its compute settings. Every file is written whole or not at all
//! ([`write_private`]), and a secret file that group or others could open
//! is refused ([`read_secret`]) rather than trusted.
//! The disco key is not kept: each start makes a new one, which is how peers
//! learn that this device restarted and its old WireGuard sessions are gone.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use platform::keys::{CoordinatorPublic, DevicePrivate, DiscoPrivate, NodePrivate};
use serde::{Deserialize, Serialize};

use crate::contribute::ComputeSettings;

const KEYS_FILE: &str = "keys.json";
const PREFS_FILE: &str = "prefs.json";
const COMPUTE_FILE: &str = "compute.json";

#[derive(Clone)]
pub struct Keys {
    /// The node key the coordinator knows this device by.
    pub node: NodePrivate,
    /// A newer node key sent to the coordinator in a rotation whose answer
    /// never arrived: the coordinator holds either this one or `node`, and
    /// the next map stream hello finds out which (see `keyring.rs`).
    pub pending_node: Option<NodePrivate>,
    /// When the coordinator accepted `node` (registration or rotation),
    /// unix seconds; unknown for keys from before this was kept.
    pub node_obtained_at: Option<u64>,
    pub disco: DiscoPrivate,
    pub device: DevicePrivate,
}

#[derive(Serialize, Deserialize)]
struct KeysFile {
    node: String,
    device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_obtained_at: Option<u64>,
}

impl KeysFile {
    fn of(keys: &Keys) -> Self {
        KeysFile {
            node: keys.node.to_secret_text(),
            device: keys.device.to_secret_text(),
            pending_node: keys.pending_node.as_ref().map(NodePrivate::to_secret_text),
            node_obtained_at: keys.node_obtained_at,
        }
    }
}

/// Choices that survive a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefs {
    /// Coordinator this device is registered with.
    pub coordinator: Option<String>,
    /// Private CA (PEM file) the coordinator's certificate chains to, when
    /// the public web roots do not vouch for it (`meshd up --ca-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The coordinator's identity key: every map-stream message must be
    /// signed by it. Pinned at the first registration (or given to `up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_key: Option<CoordinatorPublic>,
    pub hostname: Option<String>,
    /// `meshd up` was the last word (not `down`): reconnect on start.
    pub wants_up: bool,
}

/// Ending of the temp files [`write_private`] renames into place.
const TMP_SUFFIX: &str = ".tmp";

/// Writes `contents` to `path` so that a crash or power cut leaves the old
/// file or the new one, never a mix, and no moment where others may read
/// it: a temp file of its own in the same directory, created 0600, synced,
/// renamed over `path`, then the directory synced so the rename itself is
/// on disk.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    // Unique per write: two writers of one file never share a temp file.
    let tmp = dir.join(format!(
        ".{}.{}-{}{TMP_SUFFIX}",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // Exactly 0600 whatever the umask.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error(
        "{path} holds a secret but its mode is {mode:04o}: group or others may open it; \
         run `chmod 600 {path}` (and replace the secret if someone else could have read it)"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a file holding a secret (a key, token or pre-shared key). One that
/// group or others may read or write is refused: it may have leaked or been
/// swapped, and loading it quietly would hide that. The mode is checked on
/// the opened file, so a file changed between check and read cannot slip by.
pub fn read_secret(path: &Path) -> Result<String, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = fs::File::open(path).map_err(io)?;
    let mode = f.metadata().map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

#[derive(Clone)]
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(path)
            .with_context(|| format!("creating state dir {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        // Temp files of writes a crash cut short (`keys.tmp` from older
        // versions too); never read.
        for entry in fs::read_dir(path)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(TMP_SUFFIX) && entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(StateDir(path.to_owned()))
    }

    /// Loads the keys, generating and storing them on first use.
    pub fn keys(&self) -> anyhow::Result<Keys> {
        let path = self.0.join(KEYS_FILE);
        if path.exists() {
            let text = read_secret(&path)?;
            let f: KeysFile = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            let bad = |what: &str| format!("{} holds an invalid {what} key", path.display());
            return Ok(Keys {
                node: f.node.parse().with_context(|| bad("node"))?,
                pending_node: f
                    .pending_node
                    .map(|k| k.parse())
                    .transpose()
                    .with_context(|| bad("pending node"))?,
                node_obtained_at: f.node_obtained_at,
                disco: DiscoPrivate::generate(),
                device: f.device.parse().with_context(|| bad("device"))?,
            });
        }
        let keys = Keys {
            node: NodePrivate::generate(),
            pending_node: None,
            node_obtained_at: None,
            disco: DiscoPrivate::generate(),
            device: DevicePrivate::generate(),
        };
        self.save_keys(&keys)?;
        tracing::info!(node = %keys.node.public().short(), "generated device keys");
        Ok(keys)
    }

    /// Replaces `keys.json` atomically (the disco key is not kept).
    pub fn save_keys(&self, keys: &Keys) -> anyhow::Result<()> {
        let f = KeysFile::of(keys);
        write_private(
            &self.0.join(KEYS_FILE),
            serde_json::to_string_pretty(&f)?.as_bytes(),
        )
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
    fn pending_node_key_and_its_age_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut keys = state.keys().unwrap();
        assert!(keys.pending_node.is_none() && keys.node_obtained_at.is_none());
        let pending = NodePrivate::generate();
        keys.pending_node = Some(pending.clone());
        keys.node_obtained_at = Some(1_700_000_000);
        state.save_keys(&keys).unwrap();
        let back = state.keys().unwrap();
        assert_eq!(back.node.public(), keys.node.public());
        assert_eq!(
            back.pending_node.map(|k| k.public()),
            Some(pending.public())
        );
        assert_eq!(back.node_obtained_at, Some(1_700_000_000));
        assert_eq!(back.device.public(), keys.device.public());
    }

    #[test]
    fn a_keys_file_others_may_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let keys = state.keys().unwrap();
        let path = dir.path().join(KEYS_FILE);
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = format!("{:#}", state.keys().err().expect("refused"));
            assert!(
                err.contains(&format!("mode is {mode:04o}")) && err.contains("chmod 600"),
                "{err}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(state.keys().unwrap().node.public(), keys.node.public());
    }

    #[test]
    fn secrets_are_read_only_from_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.psk");
        fs::write(&path, "s3cret").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "s3cret");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_secret(&path),
            Err(SecretFileError::TooOpen { mode: 0o644, .. })
        ));
        assert!(matches!(
            read_secret(&dir.path().join("missing")),
            Err(SecretFileError::Io { .. })
        ));
    }

    #[test]
    fn writes_replace_the_file_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["token".to_owned()], "no temp file left behind");
    }

    #[test]
    fn concurrent_writers_of_one_file_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREFS_FILE);
        let a = "a".repeat(64 << 10);
        let b = "b".repeat(64 << 10);
        std::thread::scope(|s| {
            for body in [&a, &b] {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_private(path, body.as_bytes()).unwrap();
                    }
                });
            }
        });
        let last = fs::read_to_string(&path).unwrap();
        assert!(last == a || last == b, "a mix of two writes");
    }

    #[test]
    fn temp_files_of_interrupted_writes_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!(".{KEYS_FILE}.1-0{TMP_SUFFIX}"));
        let older = dir.path().join("keys.tmp");
        for f in [&stale, &older] {
            fs::write(f, "half a key").unwrap();
        }
        StateDir::open(dir.path()).unwrap();
        assert!(!stale.exists() && !older.exists());
    }

    #[test]
    fn prefs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.prefs().unwrap(), Prefs::default());
        let p = Prefs {
            coordinator: Some("http://c:8080".into()),
            ca_file: Some("/etc/crank/ca.pem".into()),
            coordinator_key: Some(platform::keys::CoordinatorPrivate::generate().public()),
            hostname: None,
            wants_up: true,
        };
        state.save_prefs(&p).unwrap();
        assert_eq!(state.prefs().unwrap(), p);
    }

    #[test]
    fn prefs_written_before_ca_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        fs::write(
            dir.path().join(PREFS_FILE),
            r#"{"coordinator":"http://c:8080","hostname":null,"wants_up":true}"#,
        )
        .unwrap();
        let p = state.prefs().unwrap();
        assert_eq!(p.ca_file, None);
        assert_eq!(p.coordinator.as_deref(), Some("http://c:8080"));
    }
}
