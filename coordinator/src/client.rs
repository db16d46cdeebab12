//! The coordinator CLI's HTTP client: how `coordinator` subcommands reach a
//! running coordinator over its API (TLS trust as in `platform::tls`).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

/// An HTTP client that trusts the public web roots plus, if given, the
/// private CA in `ca_file` (PEM).
pub fn http_client(ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let ca = ca_file
        .map(|p| std::fs::read(p).with_context(|| format!("reading the CA file {}", p.display())))
        .transpose()?;
    let tls = platform::tls::client_config(ca.as_deref()).context("the coordinator CA file")?;
    reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(tls))
        .build()
        .context("building the HTTP client")
}

/// Where the CLI finds a running coordinator and whose token it uses:
/// `coordinator login` saves them; the environment overrides the file.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Login {
    pub url: String,
    pub token: String,
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

impl Login {
    /// `$XDG_CONFIG_HOME/crank-mesh/coordinator.json`, else under `~/.config`.
    pub fn path() -> anyhow::Result<std::path::PathBuf> {
        let base = match std::env::var_os("XDG_CONFIG_HOME") {
            Some(d) => std::path::PathBuf::from(d),
            None => std::path::PathBuf::from(
                std::env::var_os("HOME")
                    .context("HOME is not set; use COORDINATOR_URL and COORDINATOR_TOKEN")?,
            )
            .join(".config"),
        };
        Ok(base.join("crank-mesh").join("coordinator.json"))
    }

    /// Saves the login, readable by its owner only (it holds a token).
    pub fn save(&self) -> anyhow::Result<std::path::PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = Self::path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The saved login with `COORDINATOR_URL`, `COORDINATOR_TOKEN` and
    /// `COORDINATOR_CA_FILE` laid over it.
    pub fn load() -> anyhow::Result<Login> {
        let mut login = match Self::path().ok().filter(|p| p.exists()) {
            Some(p) => serde_json::from_str(
                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
            None => Login::default(),
        };
        if let Ok(url) = std::env::var("COORDINATOR_URL") {
            login.url = url;
        }
        if let Ok(token) = std::env::var("COORDINATOR_TOKEN") {
            login.token = token;
        }
        if let Some(ca) = std::env::var_os("COORDINATOR_CA_FILE") {
            login.ca_file = Some(ca.into());
        }
        anyhow::ensure!(
            !login.url.is_empty() && !login.token.is_empty(),
            "not logged in: run `coordinator login URL --token TOKEN`, or set COORDINATOR_URL and COORDINATOR_TOKEN"
        );
        Ok(login)
    }
}

/// A running coordinator's API, called as one user.
pub struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(login: &Login) -> anyhow::Result<Remote> {
        Ok(Remote {
            base: login.url.trim_end_matches('/').to_owned(),
            token: (!login.token.is_empty()).then(|| login.token.clone()),
            http: http_client(login.ca_file.as_deref())?,
        })
    }

    /// Calls `method path` with an optional JSON body; a non-2xx answer
    /// becomes an error carrying the server's message.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .timeout(std::time::Duration::from_secs(30));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        self.finish(req, &method, path).await
    }

    /// Calls `method path` with a text body (a policy document, which is
    /// JSON with comments and so not sent as JSON).
    pub async fn call_text<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: String,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .timeout(std::time::Duration::from_secs(30))
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        self.finish(req, &method, path).await
    }

    async fn finish<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        method: &reqwest::Method,
        path: &str,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let resp = req
            .send()
            .await
            .with_context(|| format!("reaching the coordinator at {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the reply")?;
        if !status.is_success() {
            return Err(failure(method, path, status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .with_context(|| format!("parsing the reply to {method} {path}"))
    }
}

/// A non-2xx answer as an error carrying the server's message.
fn failure(
    method: &reqwest::Method,
    path: &str,
    status: reqwest::StatusCode,
    bytes: &[u8],
) -> anyhow::Error {
    let msg = serde_json::from_slice::<platform::api::ApiError>(bytes)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    anyhow::anyhow!("{method} {path}: {status}: {msg}")
}

impl Remote {
    /// `GET path`, copying the answer to `out` as it arrives (for exports
    /// too large to hold); a non-2xx answer becomes an error.
    pub async fn download(&self, path: &str, out: &mut impl std::io::Write) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req
            .send()
            .await
            .with_context(|| format!("reaching the coordinator at {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.context("reading the reply")?;
            return Err(failure(&reqwest::Method::GET, path, status, &bytes));
        }
        while let Some(chunk) = resp.chunk().await.context("reading the reply")? {
            out.write_all(&chunk).context("writing the output")?;
        }
        out.flush().context("writing the output")?;
        Ok(())
    }
}
