//! Storage: SQLite in WAL mode under the state directory, versioned
//! migrations, and the queries the API needs.

mod access;
pub mod audit;
pub mod compute_rules;
mod devices;
mod invites;
pub mod ledger;
mod networks;
mod pairing;
pub mod people;
pub mod policy;
mod preauth;

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use platform::addr::UlaPrefix;
use platform::control_auth::CoordinatorIdentity;
use platform::keys::{CoordinatorPrivate, ProofPrivate};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

pub use access::Rotated;
pub use devices::{check_registration, DeviceRow, NewWireguardPeer, Registered, Registration};
pub use pairing::{normalize_code, Pairing};
pub use people::{NetCtx, UserRow};

use crate::error::AppError;

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "coordinator.db";

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Seconds a removed device's address rests before it is reused.
    address_quarantine: u64,
}

/// How the database is opened and what the store enforces.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a statement waits for another connection's write lock
    /// before failing. Default 10 s.
    pub busy_timeout: Duration,
    /// How long a removed device's overlay address stays unused, so that
    /// peers and caches still holding it cannot reach a newer device by
    /// mistake. Default 24 h.
    pub address_quarantine: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            busy_timeout: Duration::from_secs(10),
            address_quarantine: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// A random secret with a readable prefix, as hex.
pub fn random_secret(prefix: &str) -> String {
    let mut b = [0u8; 24];
    OsRng.fill_bytes(&mut b);
    format!("{prefix}-{}", hex::encode(b))
}

/// Secrets are stored only as their SHA-256.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl Store {
    /// Opens (creating if needed) the database in `state_dir` and brings the
    /// schema up to date.
    pub async fn open(state_dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(state_dir, &StoreOptions::default()).await
    }

    /// [`Store::open`] with other options.
    pub async fn open_with(state_dir: &Path, options: &StoreOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state dir {}", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        // The path is given as a file name, never spliced into a URL: any
        // character a directory name may hold (`?`, `#`, `%`) stays literal.
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .context("running migrations")?;
        Ok(Store {
            pool,
            address_quarantine: options.address_quarantine.as_secs(),
        })
    }

    pub async fn is_initialized(&self) -> Result<bool, AppError> {
        Ok(self.setting("ula_prefix").await?.is_some())
    }

    /// First-time setup: the network's IPv6 prefix and a first user (who
    /// will own the networks made from the state directory), whose token is
    /// returned (and stored only hashed).
    pub async fn init(&self, now: u64) -> Result<String, AppError> {
        self.init_as("admin", now).await
    }

    pub async fn init_as(&self, username: &str, now: u64) -> Result<String, AppError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<(String,)> =
            sqlx::query_as("SELECT value FROM settings WHERE key = 'ula_prefix'")
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_some() {
            return Err(AppError::Conflict(
                "coordinator is already initialised".into(),
            ));
        }
        let mut id = [0u8; 5];
        OsRng.fill_bytes(&mut id);
        let ula = UlaPrefix::from_global_id(id);
        sqlx::query("INSERT INTO settings (key, value) VALUES ('ula_prefix', ?)")
            .bind(ula.to_string())
            .execute(&mut *tx)
            .await?;
        let user = Self::insert_user(&mut tx, username, None, now).await?;
        let token = Self::insert_token(&mut tx, user.id, now).await?;
        tx.commit().await?;
        Ok(token)
    }

    async fn setting(&self, key: &str) -> Result<Option<String>, AppError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// The coordinator's identity and proof keys, made on first use and kept
    /// in the database (so every process serving it speaks as one). Two
    /// processes racing to make them keep whichever was stored first.
    pub async fn identity(&self) -> Result<CoordinatorIdentity, AppError> {
        let fresh = CoordinatorIdentity::generate();
        for (key, value) in [
            ("coordinator_identity", fresh.identity.to_secret_text()),
            ("coordinator_proof", fresh.proof.to_secret_text()),
        ] {
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        }
        let read = |key: &'static str| async move {
            self.setting(key)
                .await?
                .ok_or_else(|| AppError::Internal(anyhow::anyhow!("{key} missing")))
        };
        let identity: CoordinatorPrivate = read("coordinator_identity")
            .await?
            .parse()
            .map_err(|e| AppError::Internal(anyhow::anyhow!("stored coordinator key: {e}")))?;
        let proof: ProofPrivate = read("coordinator_proof").await?.parse().map_err(|e| {
            AppError::Internal(anyhow::anyhow!("stored coordinator proof key: {e}"))
        })?;
        Ok(CoordinatorIdentity { identity, proof })
    }

    pub async fn ula_prefix(&self) -> Result<UlaPrefix, AppError> {
        let text = self.setting("ula_prefix").await?.ok_or_else(|| {
            anyhow::anyhow!("coordinator is not initialised: run `coordinator init`")
        })?;
        text.parse()
            .map_err(|e| AppError::Internal(anyhow::anyhow!("stored ULA prefix {text:?}: {e}")))
    }

    /// A token a relay presents for admission checks; returned once.
    pub async fn create_relay_token(&self, name: &str, now: u64) -> Result<String, AppError> {
        let token = random_secret("meshrelay");
        sqlx::query("INSERT INTO relay_tokens (name, token_hash, created_at) VALUES (?, ?, ?)")
            .bind(name)
            .bind(secret_hash(&token))
            .bind(now as i64)
            .execute(&self.pool)
            .await?;
        Ok(token)
    }

    pub async fn relay_token_valid(&self, token: &str) -> Result<bool, AppError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT id FROM relay_tokens WHERE token_hash = ?")
                .bind(secret_hash(token))
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// True when a database error is a UNIQUE constraint violation.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[cfg(test)]
pub(crate) async fn test_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).await.expect("open store");
    (store, dir)
}

#[cfg(test)]
pub(crate) async fn test_store_with(options: &StoreOptions) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open_with(dir.path(), options)
        .await
        .expect("open store");
    (store, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_state_dir_with_url_characters_opens() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("state?mode=ro#x%20y");
        let store = Store::open(&odd).await.unwrap();
        store.init(1).await.unwrap();
        assert!(
            odd.join(DB_FILE).is_file(),
            "the database lives where it was asked to, not at a truncated path"
        );
    }

    #[tokio::test]
    async fn init_once() {
        let (store, _dir) = test_store().await;
        assert!(!store.is_initialized().await.unwrap());
        let token = store.init(1).await.unwrap();
        assert!(token.starts_with("meshtok-"));
        let user = store.user_by_token(&token).await.unwrap().unwrap();
        assert_eq!(user.username, "admin");
        assert!(store.user_by_token("meshtok-nope").await.unwrap().is_none());
        assert!(matches!(store.init(2).await, Err(AppError::Conflict(_))));
        assert!(store.ula_prefix().await.is_ok());
        let relay = store.create_relay_token("r1", 3).await.unwrap();
        assert!(store.relay_token_valid(&relay).await.unwrap());
        assert!(
            store.user_by_token(&relay).await.unwrap().is_none(),
            "relay tokens are not user tokens"
        );
        assert!(!store.relay_token_valid(&token).await.unwrap());
    }
}
