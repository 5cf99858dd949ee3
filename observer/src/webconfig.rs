//! `--web.config.file`: TLS and HTTP basic auth for the daemon's endpoints,
//! in the format node_exporter and the other Prometheus exporters read:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt   # relative paths are relative to this file
//!   key_file: server.key
//! basic_auth_users:
//!   prometheus: $2y$10$...  # bcrypt hash (htpasswd -nBC 10 prometheus)
//! ```
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFiles>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// What the daemon enforces on every request.
#[derive(Clone, Default)]
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// user → bcrypt hash; empty means no authentication.
    users: BTreeMap<String, String>,
}

fn read(base: &Path, file: &Path) -> Result<Vec<u8>> {
    let path = base.join(file);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

fn tls_config(base: &Path, files: &TlsFiles) -> Result<rustls::ServerConfig> {
    let certs = rustls_pemfile::certs(&mut read(base, &files.cert_file)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .context("cert_file is not PEM certificates")?;
    if certs.is_empty() {
        bail!(
            "cert_file {} holds no certificate",
            files.cert_file.display()
        );
    }
    let key = rustls_pemfile::private_key(&mut read(base, &files.key_file)?.as_slice())
        .context("key_file is not a PEM private key")?
        .with_context(|| format!("key_file {} holds no private key", files.key_file.display()))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("cert_file and key_file do not form a usable certificate")
}

impl WebConfig {
    /// Reads and checks the file; every problem is one error naming it.
    pub fn load(path: &Path) -> Result<WebConfig> {
        let context = || format!("--web.config.file {}", path.display());
        let text = std::fs::read_to_string(path).with_context(context)?;
        Self::parse(&text, path.parent().unwrap_or(Path::new("."))).with_context(context)
    }

    /// Checks a configuration's text; files it names are read relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<WebConfig> {
        let file: File = serde_yaml::from_str(text).context("not a valid web configuration")?;
        let tls = match &file.tls_server_config {
            Some(files) => Some(Arc::new(tls_config(base, files)?)),
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                bail!(
                    "the password of {user:?} is not a bcrypt hash (make one with `htpasswd -nBC 10 {user}`)"
                );
            }
        }
        Ok(WebConfig {
            tls,
            users: file.basic_auth_users,
        })
    }

    /// Whether a request with this `Authorization` header may proceed.
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(encoded) = authorization.and_then(|h| h.strip_prefix(b"Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Some((user, password)) = std::str::from_utf8(&decoded)
            .ok()
            .and_then(|s| s.split_once(':'))
        else {
            return false;
        };
        self.users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(users: &[(&str, &str)]) -> WebConfig {
        WebConfig {
            tls: None,
            users: users
                .iter()
                .map(|(u, h)| (u.to_string(), h.to_string()))
                .collect(),
        }
    }

    fn basic(user_pass: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
        .into_bytes()
    }

    #[test]
    fn basic_auth_accepts_only_the_right_password() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let c = config(&[("alice", &hash)]);
        assert!(c.authorized(Some(&basic("alice:secret"))));
        assert!(!c.authorized(Some(&basic("alice:wrong"))));
        assert!(!c.authorized(Some(&basic("bob:secret"))));
        assert!(!c.authorized(None));
        assert!(!c.authorized(Some(b"Basic !!!not-base64")));
        assert!(!c.authorized(Some(b"Bearer abc")));
    }

    #[test]
    fn without_users_everything_is_allowed() {
        assert!(config(&[]).authorized(None));
    }

    #[test]
    fn unknown_keys_and_plain_passwords_are_errors() {
        let dir = std::env::temp_dir().join(format!("observer-webconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.yml");
        std::fs::write(&path, "basic_auth_user:\n  a: b\n").unwrap();
        assert!(format!("{:#}", WebConfig::load(&path).err().unwrap()).contains("unknown field"));
        std::fs::write(&path, "basic_auth_users:\n  alice: plaintext\n").unwrap();
        assert!(
            format!("{:#}", WebConfig::load(&path).err().unwrap()).contains("not a bcrypt hash")
        );
        std::fs::write(
            &path,
            "tls_server_config:\n  cert_file: none.crt\n  key_file: none.key\n",
        )
        .unwrap();
        assert!(format!("{:#}", WebConfig::load(&path).err().unwrap()).contains("none.crt"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
