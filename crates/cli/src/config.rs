//! The effective configuration of `outpost serve`: embedded defaults, then an optional TOML file
//! (`--config` or `OUTPOST_CONFIG`), then `OUTPOST_*` environment variables, then flags. Unknown
//! keys are errors, and every error names the file or variable the bad value came from.

use crate::serve::ServeArgs;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Serve HTTPS with this PEM certificate chain (server certificate first) and `tls_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM file of CA certificates to trust for the parent (`ParentEndpointProtocol=https`, or
    /// an `https` upstream), in addition to the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_ca_file: Option<PathBuf>,
    /// Directory holding blobs, uploads and the metadata database.
    pub data_dir: PathBuf,
    /// Keep blobs in an object store instead of `data_dir/blobs`: `s3://<bucket>[/<prefix>]`
    /// (Amazon S3 and compatible stores; `AWS_*` variables give credentials, region and
    /// endpoint) or `az://<container>[/<prefix>]` (Azure Blob Storage; `AZURE_STORAGE_*`).
    /// Uploads in progress and the metadata database stay in `data_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_store: Option<String>,
    /// Keep the metadata in PostgreSQL instead of `data_dir/meta.db`:
    /// `postgres://user:password@host:port/database[?sslmode=require]`. Several replicas of
    /// the root may share one database (and must then share one `blob_store`). Root only.
    /// `outpost config` prints it with the password hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// How the other replicas sharing `database_url` reach this one, `http(s)://host:port`:
    /// a replica that receives a request for an upload started here forwards it to this
    /// address. Unset: the load balancer must send each upload's requests to one replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_url: Option<String>,
    /// Log filter: error, warn, info, debug, trace, or a `tracing` directive list.
    pub log_level: String,
    /// Whether `log_level` was set by the operator (flag, environment or file) rather than
    /// left at its default: a connected registry then keeps it instead of following the level
    /// its parent configures.
    #[serde(skip)]
    pub log_level_explicit: bool,
    /// `text` (for people) or `json` (one object per line, for log shippers).
    pub log_format: String,
    /// Largest manifest accepted, in bytes.
    pub max_manifest_bytes: usize,
    /// Largest blob accepted, in bytes (0 = unlimited).
    pub max_blob_bytes: u64,
    /// Upload sessions untouched for this many seconds are removed.
    pub upload_max_age_secs: u64,
    /// Garbage collection of unreferenced blobs on `gc_schedule` (a connected registry follows
    /// the setting its parent configures instead).
    pub gc_enabled: bool,
    /// Five-field cron expression, UTC.
    pub gc_schedule: String,
    /// Blobs stored or linked more recently than this are spared (a push or sync that has its
    /// layers and not yet its manifest).
    pub gc_min_age_secs: u64,
    /// Allow pulls without credentials.
    pub anonymous_pull: bool,
    /// Serve Prometheus metrics at `/metrics` (no credentials; no repository or token names).
    pub metrics_enabled: bool,
    /// Name of this registry in token challenges (the `service` of issued access tokens).
    pub service: String,
    /// The address clients use, `http(s)://host[:port]`, when it is not the one they reach
    /// this process at (behind a reverse proxy): token challenges name their realm there.
    /// Unset: from the request (`X-Forwarded-Proto`/`-Host`, `Forwarded`, `Host`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Password of the `admin` token. Set on first start (otherwise one is generated and
    /// printed once); setting it later resets the password. Never printed by `outpost config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_password: Option<String>,
    /// Most tokens this registry holds.
    pub max_tokens: u64,
    /// Most scope maps this registry holds.
    pub max_scope_maps: u64,
    /// Most repositories one scope map may name.
    pub max_repository_rules: u64,
    /// How local clients and child registries reach this node (`host[:port]`), reported to
    /// the parent for the connection strings of children (also `ACR_REGISTRY_LOGIN_SERVER`).
    /// Unset: the listen address, unless that is a wildcard such as `0.0.0.0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_server: Option<String>,
    /// Run as a connected registry following the parent this names (also
    /// `ACR_REGISTRY_CONNECTION_STRING`). Never printed by `outpost config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_string: Option<String>,
    /// Longest wait of one long-poll of the parent's message feed, in seconds.
    pub sync_poll_secs: u64,
    /// Longest silence, in seconds, while reading from the parent (or upstream) before a
    /// transfer is abandoned and resumed: a link that stalls without closing.
    pub sync_read_timeout_secs: u64,
    /// Mirror a plain OCI registry (no Outpost gateway) at this URL, read-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_url: Option<String>,
    /// The repositories to mirror from `upstream_url`.
    pub upstream_repositories: Vec<String>,
    /// Credentials for `upstream_url`, if it needs any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_password: Option<String>,
    /// Seconds between two polls of `upstream_url`.
    pub upstream_poll_secs: u64,
    /// POST the notifications connected registries send (kept at the root) to this URL, in
    /// order, retried until taken. Root only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_url: Option<String>,
    /// `Authorization` header value sent with each delivery to `notification_url`. Never
    /// printed by `outpost config`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_authorization: Option<String>,
    /// Most connected registries under this root, at every depth.
    pub max_connected_registries: usize,
    /// Most client tokens per connected registry.
    pub max_client_tokens: usize,
    /// Bounds of a connected registry's sync window (ISO 8601 durations).
    pub min_sync_window: String,
    pub max_sync_window: String,
    /// Bounds of a connected registry's message TTL (ISO 8601 durations).
    pub min_message_ttl: String,
    pub max_message_ttl: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            tls_cert: None,
            tls_key: None,
            parent_ca_file: None,
            data_dir: PathBuf::from("./outpost-data"),
            blob_store: None,
            database_url: None,
            replica_url: None,
            log_level: "info".into(),
            log_level_explicit: false,
            log_format: "text".into(),
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: 0,
            upload_max_age_secs: 24 * 3600,
            gc_enabled: true,
            gc_schedule: "0 0 * * *".into(),
            gc_min_age_secs: 24 * 3600,
            anonymous_pull: false,
            metrics_enabled: true,
            service: "outpost".into(),
            public_url: None,
            admin_password: None,
            max_tokens: 20_000,
            max_scope_maps: 20_000,
            max_repository_rules: 500,
            login_server: None,
            connection_string: None,
            sync_poll_secs: 25,
            sync_read_timeout_secs: 60,
            upstream_url: None,
            upstream_repositories: Vec::new(),
            upstream_username: None,
            upstream_password: None,
            upstream_poll_secs: 30,
            notification_url: None,
            notification_authorization: None,
            max_connected_registries: 50,
            max_client_tokens: 20,
            min_sync_window: "PT1H".into(),
            max_sync_window: "P7D".into(),
            min_message_ttl: "P1D".into(),
            max_message_ttl: "P90D".into(),
        }
    }
}

/// Flag values that override everything else (only those given).
#[derive(Serialize, Default)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_string: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_ca_file: Option<PathBuf>,
}

/// `public_url` as given, without a trailing `/`, if it is `http(s)://host[:port]`.
fn check_public_url(url: &str) -> anyhow::Result<String> {
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"));
    match rest {
        Some(host)
            if !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) =>
        {
            Ok(trimmed.to_string())
        }
        _ => anyhow::bail!(
            "public_url {url:?} is not http(s)://host[:port] (no path): it is the address \
             clients use to reach this registry, e.g. https://registry.example.com"
        ),
    }
}

/// The value of ACR's environment variable `acr` (non-empty), unless the flag or the
/// `OUTPOST_` variable that outranks it is set.
fn acr_alias(acr: &str, outpost: &str, flag_set: bool) -> Option<String> {
    if flag_set || std::env::var_os(outpost).is_some_and(|v| !v.is_empty()) {
        return None;
    }
    std::env::var(acr).ok().filter(|s| !s.is_empty())
}

impl Config {
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let file = args
            .config
            .clone()
            .or_else(|| std::env::var_os("OUTPOST_CONFIG").map(PathBuf::from));
        if let Some(path) = &file {
            anyhow::ensure!(
                path.is_file(),
                "config file {} does not exist",
                path.display()
            );
            fig = fig.merge(Toml::file(path));
        }
        // The management commands' variables are not server settings.
        let mut ignored = vec!["config", "registry", "username", "password"];
        // A list in a variable is written as TOML (`["a/b","c"]`) or, as people write lists
        // in variables, comma-separated (`a/b,c`).
        let repositories = std::env::var("OUTPOST_UPSTREAM_REPOSITORIES")
            .ok()
            .filter(|v| !v.trim().is_empty() && !v.trim_start().starts_with('['));
        if repositories.is_some() {
            ignored.push("upstream_repositories");
        }
        fig = fig.merge(Env::prefixed("OUTPOST_").ignore(&ignored));
        if let Some(list) = repositories {
            let list: Vec<String> = list
                .split(',')
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty())
                .collect();
            fig = fig.merge(Serialized::default("upstream_repositories", list));
        }
        fig = fig.merge(Serialized::defaults(Overrides {
            listen: args.listen,
            data_dir: args.data_dir.clone(),
            log_level: args.log_level.clone(),
            connection_string: args.connection_string.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            parent_ca_file: args.parent_ca_file.clone(),
        }));
        let mut config: Config = fig.extract().map_err(explain)?;
        config.log_level_explicit = args.log_level.is_some()
            || std::env::var_os("OUTPOST_LOG_LEVEL").is_some_and(|v| !v.is_empty())
            || file
                .as_ref()
                .is_some_and(|p| Figment::from(Toml::file(p)).find_value("log_level").is_ok());
        // ACR's variables rank with the environment: above the file, below the OUTPOST_ ones
        // and the flags. get-settings prints a placeholder for the login server ("<Optional:
        // …>"): copied into an environment file unchanged, it means "not set".
        if let Some(v) = acr_alias("ACR_REGISTRY_LOGIN_SERVER", "OUTPOST_LOGIN_SERVER", false)
            .filter(|s| !s.starts_with('<'))
        {
            config.login_server = Some(v);
        }
        if let Some(u) = config.public_url.take() {
            config.public_url = Some(check_public_url(&u)?);
        }
        if let Some(l) = &config.login_server {
            outpost_control::connstr::check_endpoint(l).map_err(|why| {
                anyhow::anyhow!(
                    "login_server {why}; it is the address clients and child registries use to reach this registry"
                )
            })?;
        }
        if let Some(v) = acr_alias(
            "ACR_REGISTRY_CONNECTION_STRING",
            "OUTPOST_CONNECTION_STRING",
            args.connection_string.is_some(),
        ) {
            config.connection_string = Some(v);
        }
        // Checked before anything is written: a first start that fails here must not have
        // created (and printed, once) the administrator's password.
        if let Some(cs) = &config.connection_string {
            let parsed =
                outpost_control::ConnectionString::parse(cs).map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(
                parsed.sync_token_password != "***",
                "the connection string's SyncTokenPassword is ***, the mask `outpost config` \
                 prints in its place: give the string this registry was started with, or a new \
                 one from `outpost connected-registry get-settings -n {} --parent-protocol \
                 <http|https> --generate-password 1 -y` at the parent",
                parsed.connected_registry_name
            );
        }
        if let Some(u) = &config.upstream_url {
            anyhow::ensure!(
                config.connection_string.is_none(),
                "upstream_url and a connection string are both set: a registry either mirrors a \
                 plain registry (upstream_url) or is a connected registry (the connection \
                 string); unset one"
            );
            anyhow::ensure!(
                reqwest::Url::parse(u)
                    .ok()
                    .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host()),
                "upstream_url {u:?} is not an http:// or https:// URL (write it as \
                 https://registry.example or http://host:port)"
            );
            for r in &config.upstream_repositories {
                r.parse::<outpost_oci::RepoName>().map_err(|e| {
                    anyhow::anyhow!(
                        "upstream_repositories: {e} (each entry is one repository; patterns \
                         such as team/* are not supported for a plain upstream: many registries \
                         do not list their repositories)"
                    )
                })?;
            }
        }
        anyhow::ensure!(
            matches!(config.log_format.as_str(), "text" | "json"),
            "log_format {:?} is not text or json",
            config.log_format
        );
        anyhow::ensure!(
            config.max_manifest_bytes > 0,
            "max_manifest_bytes must be positive"
        );
        anyhow::ensure!(
            config.upload_max_age_secs > 0,
            "upload_max_age_secs must be positive"
        );
        outpost_control::connected::parse_schedule("gc_schedule", &config.gc_schedule)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        anyhow::ensure!(
            config.sync_read_timeout_secs > 0,
            "sync_read_timeout_secs must be positive"
        );
        if let Some(u) = &config.notification_url {
            let parsed = reqwest::Url::parse(u)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            anyhow::ensure!(
                parsed.is_some(),
                "notification_url is not an http:// or https:// URL"
            );
            anyhow::ensure!(
                parsed.is_some_and(|u| u.username().is_empty() && u.password().is_none()),
                "notification_url must not hold credentials (they would be logged and shown by \
                 `outpost config`); put them in notification_authorization, e.g. \
                 \"Basic <base64 of user:password>\""
            );
            anyhow::ensure!(
                config.connection_string.is_none() && config.upstream_url.is_none(),
                "notification_url is for the root registry: a connected registry passes its \
                 notifications (and its children's) up to the root, which delivers them"
            );
        }
        if let Some(a) = &config.notification_authorization {
            anyhow::ensure!(
                config.notification_url.is_some(),
                "notification_authorization is set but notification_url is not"
            );
            anyhow::ensure!(
                reqwest::header::HeaderValue::from_str(a).is_ok(),
                "notification_authorization is not a valid HTTP header value (no line breaks or \
                 control characters)"
            );
        }
        if let Some(url) = &config.blob_store {
            outpost_registry::Storage::check_blob_store_url(url)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        }
        if let Some(url) = &config.database_url {
            anyhow::ensure!(
                outpost_meta::is_postgres_url(url),
                "invalid configuration: database_url {} is not a PostgreSQL URL; write it as \
                 postgres://user:password@host:port/database (leave it unset to keep the \
                 metadata in {}/meta.db)",
                outpost_meta::redact_url(url),
                config.data_dir.display()
            );
            anyhow::ensure!(
                config.connection_string.is_none() && config.upstream_url.is_none(),
                "database_url is for the root registry: a connected registry keeps its metadata \
                 in SQLite in its data directory (unset database_url, or OUTPOST_DATABASE_URL)"
            );
        }
        if let Some(url) = &config.replica_url {
            let parsed = reqwest::Url::parse(url).ok();
            anyhow::ensure!(
                parsed.as_ref().is_some_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.username().is_empty()
                        && u.password().is_none()
                        && u.path() == "/"
                        && u.query().is_none()
                        && u.fragment().is_none()
                }),
                "invalid configuration: replica_url {url:?} must be how the other replicas reach \
                 this one, http(s)://host:port, with no path, query or credentials"
            );
            anyhow::ensure!(
                config.database_url.is_some(),
                "replica_url is set but database_url is not: replicas share a PostgreSQL \
                 database (database_url) and forward uploads to each other through replica_url"
            );
        }
        anyhow::ensure!(
            config.tls_cert.is_some() == config.tls_key.is_some(),
            "HTTPS needs both tls_cert and tls_key (--tls-cert and --tls-key, or OUTPOST_TLS_CERT and \
             OUTPOST_TLS_KEY); only {} is set",
            if config.tls_cert.is_some() {
                "tls_cert"
            } else {
                "tls_key"
            }
        );
        // Checked here too (serve uses them later), so that `outpost config` refuses what
        // `outpost serve` would.
        crate::serve::env_filter(&config.log_level)?;
        config.connected_limits()?;
        Ok(config)
    }

    /// The connected-registry limits, with durations parsed.
    pub fn connected_limits(&self) -> anyhow::Result<outpost_control::ConnectedLimits> {
        let d = |key: &str, v: &str| {
            outpost_control::connected::parse_duration(key, v)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
        };
        let l = outpost_control::ConnectedLimits {
            max_connected_registries: self.max_connected_registries,
            max_client_tokens: self.max_client_tokens,
            min_sync_window: d("min_sync_window", &self.min_sync_window)?,
            max_sync_window: d("max_sync_window", &self.max_sync_window)?,
            min_message_ttl: d("min_message_ttl", &self.min_message_ttl)?,
            max_message_ttl: d("max_message_ttl", &self.max_message_ttl)?,
            ..Default::default()
        };
        anyhow::ensure!(
            l.min_sync_window <= l.max_sync_window,
            "min_sync_window is longer than max_sync_window"
        );
        anyhow::ensure!(
            l.min_message_ttl <= l.max_message_ttl,
            "min_message_ttl is longer than max_message_ttl"
        );
        Ok(l)
    }

    /// Every setting as TOML (`outpost config`), secrets left out: the admin password, the
    /// connection string (it holds the sync token's password), the upstream password and the
    /// webhook's `Authorization` value.
    pub fn to_toml(&self) -> String {
        let (shown, secrets) = self.shown();
        let mut out = String::new();
        for (key, value) in shown {
            // Strings, numbers, booleans and arrays of strings are written alike in JSON
            // and TOML. A value shown with its password masked is a comment: loaded back, the
            // mask would be taken for the password (and the parent refuse it).
            match key.as_str() {
                "connection_string" => out.push_str(&format!(
                    "# connection_string = {value} (set; its password is not shown)\n"
                )),
                "database_url"
                    if self
                        .database_url
                        .as_deref()
                        .is_some_and(|u| outpost_meta::redact_url(u) != u) =>
                {
                    out.push_str(&format!(
                        "# database_url = {value} (set; its password is not shown)\n"
                    ))
                }
                // Not pinned here: printed as a setting, it would stop following the parent.
                "log_level" if !self.log_level_explicit && self.connection_string.is_some() => out
                    .push_str(&format!(
                        "# log_level = {value} (not set here: the parent's log level applies \
                         once synced)\n"
                    )),
                _ => out.push_str(&format!("{key} = {value}\n")),
            }
        }
        for key in secrets {
            out.push_str(&format!("# {key} is set (not shown)\n"));
        }
        out
    }

    /// `outpost config -o json`: the settings `to_toml` prints, and the names of the secrets
    /// that are set (`secretsSet`), without their values.
    pub fn to_json(&self) -> serde_json::Value {
        let (mut shown, secrets) = self.shown();
        shown.insert("secretsSet".into(), secrets.into());
        serde_json::Value::Object(shown)
    }

    /// The settings as `outpost config` shows them (unset ones left out, the connection
    /// string's password and the database URL's hidden), and which secrets are set.
    fn shown(
        &self,
    ) -> (
        serde_json::Map<String, serde_json::Value>,
        Vec<&'static str>,
    ) {
        let mut shown = serde_json::Map::new();
        let mut secrets = Vec::new();
        let Ok(serde_json::Value::Object(map)) = serde_json::to_value(self) else {
            return (shown, secrets);
        };
        for (key, value) in map {
            if let Some(secret) = [
                "admin_password",
                "upstream_password",
                "notification_authorization",
            ]
            .into_iter()
            .find(|s| *s == key)
            {
                if !value.is_null() {
                    secrets.push(secret);
                }
                continue;
            }
            if value.is_null() {
                continue;
            }
            let value = match key.as_str() {
                // Whether this node runs as a connected registry, and of what, without the
                // password.
                "connection_string" => serde_json::Value::String(
                    value
                        .as_str()
                        .unwrap_or_default()
                        .split(';')
                        .map(|kv| match kv.split_once('=') {
                            Some((k, _)) if k.trim().eq_ignore_ascii_case("SyncTokenPassword") => {
                                format!("{k}=***")
                            }
                            _ => kv.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(";"),
                ),
                "database_url" => serde_json::Value::String(
                    value
                        .as_str()
                        .map(outpost_meta::redact_url)
                        .unwrap_or_default(),
                ),
                _ => value,
            };
            shown.insert(key, value);
        }
        (shown, secrets)
    }
}

/// figment's errors, with a setting that came from the environment named as the variable
/// the operator set (`OUTPOST_LISEN`, not key "LISEN" in "`OUTPOST_` environment
/// variable(s)"), and without the list of every setting.
fn explain(e: figment::Error) -> anyhow::Error {
    let lines: Vec<String> = e
        .into_iter()
        .map(|e| {
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            match (&e.kind, from_env) {
                (figment::error::Kind::UnknownField(name, _), true) => format!(
                    "OUTPOST_{} is not a setting (see `outpost serve --help` and \
                     config.example.toml for the settings)",
                    name.to_ascii_uppercase()
                ),
                (figment::error::Kind::UnknownField(name, _), false) => format!(
                    "unknown setting {name:?}{} (see config.example.toml for the settings)",
                    e.metadata
                        .as_ref()
                        .and_then(|m| m.source.as_ref())
                        .map(|s| format!(" in {s}"))
                        .unwrap_or_default()
                ),
                (kind, true) if !e.path.is_empty() => {
                    format!("OUTPOST_{}: {kind}", e.path.join("_").to_ascii_uppercase())
                }
                (kind, false) if !e.path.is_empty() => format!(
                    "setting {:?}{}: {kind}",
                    e.path.join("."),
                    e.metadata
                        .as_ref()
                        .and_then(|m| m.source.as_ref())
                        .map(|s| format!(" in {s}"))
                        .unwrap_or_default()
                ),
                _ => e.to_string(),
            }
        })
        .collect();
    anyhow::anyhow!("invalid configuration: {}", lines.join("; "))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs::default()
    }

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config.example.toml");
        let parsed: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(path))
            .extract()
            .expect("config.example.toml parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn config_prints_every_setting_and_no_secret() {
        let c = Config {
            anonymous_pull: true,
            metrics_enabled: false,
            upstream_repositories: vec!["a/b".into(), "c".into()],
            admin_password: Some("hunter2".into()),
            connection_string: Some(
                "ConnectedRegistryName=site-one;SyncTokenName=site-one;SyncTokenPassword=cs-secret;ParentGatewayEndpoint=cloud.example:5000;ParentEndpointProtocol=https".into(),
            ),
            database_url: Some("postgres://outpost:pg-secret@db:5432/outpost".into()),
            upstream_password: Some("upstream-secret".into()),
            notification_url: Some("https://hooks.example/outpost".into()),
            notification_authorization: Some("Bearer hook-secret".into()),
            ..Config::default()
        };
        let text = c.to_toml();
        assert!(text.contains("https://hooks.example/outpost"), "{text}");
        // Whether it runs as a connected registry, and of what, is shown, as a comment: the
        // password is masked, and a masked password must not load back.
        assert!(
            text.contains(
                "\n# connection_string = \"ConnectedRegistryName=site-one;SyncTokenName=site-one;SyncTokenPassword=***;"
            ),
            "{text}"
        );
        assert!(
            text.contains("\n# database_url = \"postgres://outpost:***@db:5432/outpost\""),
            "{text}"
        );
        for secret in ["hunter2", "secret"] {
            assert!(!text.contains(secret), "{text}");
        }
        // The secrets that are set are named, as comments.
        for key in [
            "admin_password",
            "upstream_password",
            "notification_authorization",
        ] {
            assert!(
                text.contains(&format!("\n# {key} is set (not shown)\n")),
                "{text}"
            );
        }
        let json = c.to_json();
        assert_eq!(
            json["secretsSet"],
            serde_json::json!([
                "admin_password",
                "notification_authorization",
                "upstream_password"
            ])
        );
        assert_eq!(json["anonymous_pull"], true);
        assert!(!json.to_string().contains("secret\""), "{json}");
        // Its log level, not set here, follows the parent: said so, and not pinned by a
        // file that loads this back.
        assert!(
            text.contains("\n# log_level = \"info\" (not set here"),
            "{text}"
        );
        let set = Config {
            log_level_explicit: true,
            ..c.clone()
        };
        assert!(set.to_toml().contains("\nlog_level = \"info\"\n"));
        assert!(!set.to_toml().contains("not set here"));
        let back: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&text))
            .extract()
            .expect("outpost config prints TOML that loads back");
        assert_eq!(
            back,
            Config {
                admin_password: None,
                connection_string: None,
                upstream_password: None,
                notification_authorization: None,
                database_url: None,
                ..c
            }
        );
    }

    #[test]
    fn public_url_is_a_scheme_and_a_host() {
        assert_eq!(
            check_public_url("https://registry.example.com/").unwrap(),
            "https://registry.example.com"
        );
        assert_eq!(
            check_public_url("http://10.0.0.5:5000").unwrap(),
            "http://10.0.0.5:5000"
        );
        for bad in [
            "registry.example.com",
            "https://",
            "https://r.example/v2",
            "ftp://x",
        ] {
            let e = check_public_url(bad).unwrap_err().to_string();
            assert!(e.contains("is not http(s)://host[:port]"), "{bad}: {e}");
        }
    }

    #[test]
    fn login_server_placeholders_and_urls() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "ACR_REGISTRY_LOGIN_SERVER",
                "<Optional: the address local clients use to reach this connected registry>",
            );
            let c = Config::load(&args()).map_err(|e| e.to_string())?;
            assert_eq!(
                c.login_server, None,
                "get-settings' placeholder means unset"
            );
            jail.set_env("ACR_REGISTRY_LOGIN_SERVER", "site.example:5000");
            let c = Config::load(&args()).map_err(|e| e.to_string())?;
            assert_eq!(c.login_server.as_deref(), Some("site.example:5000"));
            jail.set_env("OUTPOST_LOGIN_SERVER", "https://site.example");
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(e.contains("host[:port]"), "{e}");
            Ok(())
        });
    }

    /// ACR's variables outrank the file (an operator rotating a site's password through its
    /// container's environment must not be overruled by a file baked into the image) and
    /// are outranked by Outpost's own variables and flags.
    #[test]
    fn acr_variables_rank_between_the_file_and_outpost_variables() {
        let cs = |name: &str| {
            format!(
                "ConnectedRegistryName={name};SyncTokenName={name};SyncTokenPassword=p;ParentGatewayEndpoint=parent.example:5000;ParentEndpointProtocol=http"
            )
        };
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                &format!(
                    "connection_string = \"{}\"\nlogin_server = \"file.example:1\"\n",
                    cs("filee")
                ),
            )?;
            let mut a = args();
            a.config = Some("c.toml".into());
            let c = Config::load(&a).map_err(|e| e.to_string())?;
            assert_eq!(c.connection_string, Some(cs("filee")));
            assert_eq!(c.login_server.as_deref(), Some("file.example:1"));

            jail.set_env("ACR_REGISTRY_CONNECTION_STRING", cs("acrrr"));
            jail.set_env("ACR_REGISTRY_LOGIN_SERVER", "acr.example:2");
            let c = Config::load(&a).map_err(|e| e.to_string())?;
            assert_eq!(c.connection_string, Some(cs("acrrr")));
            assert_eq!(c.login_server.as_deref(), Some("acr.example:2"));

            jail.set_env("OUTPOST_CONNECTION_STRING", cs("outpo"));
            jail.set_env("OUTPOST_LOGIN_SERVER", "outpost.example:3");
            let c = Config::load(&a).map_err(|e| e.to_string())?;
            assert_eq!(c.connection_string, Some(cs("outpo")));
            assert_eq!(c.login_server.as_deref(), Some("outpost.example:3"));

            a.connection_string = Some(cs("flagg"));
            let c = Config::load(&a).map_err(|e| e.to_string())?;
            assert_eq!(c.connection_string, Some(cs("flagg")));
            Ok(())
        });
    }

    /// A value of the wrong type in the file names the setting as the file writes it.
    #[test]
    fn a_bad_value_in_the_file_names_its_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "listen = 5\n")?;
            let mut a = args();
            a.config = Some("c.toml".into());
            let e = Config::load(&a).unwrap_err().to_string();
            assert!(e.contains("setting \"listen\" in "), "{e}");
            assert!(!e.contains("default."), "{e}");
            Ok(())
        });
    }

    /// What `serve` refuses, `config` (which loads the same way) refuses too.
    #[test]
    fn settings_serve_would_refuse_are_refused_at_load() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OUTPOST_LOG_LEVEL", "verbose");
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(e.contains("log_level \"verbose\" is not a level"), "{e}");
            jail.set_env("OUTPOST_LOG_LEVEL", "Information");
            jail.set_env("OUTPOST_MIN_SYNC_WINDOW", "P8D");
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(
                e.contains("min_sync_window is longer than max_sync_window"),
                "{e}"
            );
            jail.set_env("OUTPOST_MIN_SYNC_WINDOW", "PT2H");
            Config::load(&args()).map_err(|e| e.to_string())?;
            // The connection string as `outpost config` shows it, password masked.
            jail.set_env(
                "OUTPOST_CONNECTION_STRING",
                "ConnectedRegistryName=site;SyncTokenName=site;SyncTokenPassword=***;ParentGatewayEndpoint=root:5000;ParentEndpointProtocol=http",
            );
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(
                e.contains("SyncTokenPassword is ***") && e.contains("get-settings -n site"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn an_upstream_is_checked_before_serving() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OUTPOST_UPSTREAM_URL", "http://127.0.0.1:5001");
            jail.set_env("OUTPOST_UPSTREAM_REPOSITORIES", "[\"team/app\"]");
            Config::load(&args()).map_err(|e| e.to_string())?;
            for bad in ["127.0.0.1:5001", "ftp://x", "http://"] {
                jail.set_env("OUTPOST_UPSTREAM_URL", bad);
                let e = Config::load(&args()).unwrap_err().to_string();
                assert!(e.contains("http:// or https:// URL"), "{bad}: {e}");
            }
            jail.set_env("OUTPOST_UPSTREAM_URL", "http://127.0.0.1:5001");
            jail.set_env("OUTPOST_UPSTREAM_REPOSITORIES", "[\"team/*\"]");
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(
                e.contains("patterns such as team/* are not supported"),
                "{e}"
            );
            jail.set_env(
                "OUTPOST_UPSTREAM_REPOSITORIES",
                " team/app, library/alpine ,",
            );
            let c = Config::load(&args()).map_err(|e| e.to_string())?;
            assert_eq!(c.upstream_repositories, ["team/app", "library/alpine"]);
            jail.set_env("OUTPOST_UPSTREAM_REPOSITORIES", "[\"team/app\"]");
            let c = Config::load(&args()).map_err(|e| e.to_string())?;
            assert_eq!(c.upstream_repositories, ["team/app"]);
            jail.set_env(
                "OUTPOST_CONNECTION_STRING",
                "ConnectedRegistryName=site;SyncTokenName=site;SyncTokenPassword=x;ParentGatewayEndpoint=root:5000;ParentEndpointProtocol=http",
            );
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(e.contains("are both set"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn notification_url_must_be_http_and_at_the_root() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OUTPOST_NOTIFICATION_URL", "https://hooks.example/outpost");
            let c = Config::load(&args()).map_err(|e| e.to_string())?;
            assert_eq!(
                c.notification_url.as_deref(),
                Some("https://hooks.example/outpost")
            );
            for bad in ["ftp://hooks.example/x", "hooks.example/x", "http://"] {
                jail.set_env("OUTPOST_NOTIFICATION_URL", bad);
                let e = Config::load(&args()).unwrap_err().to_string();
                assert!(e.contains("http:// or https:// URL"), "{bad}: {e}");
            }
            jail.set_env(
                "OUTPOST_NOTIFICATION_URL",
                "https://u:hunter2@hooks.example/x",
            );
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(
                e.contains("notification_authorization") && !e.contains("hunter2"),
                "{e}"
            );
            jail.set_env("OUTPOST_NOTIFICATION_URL", "https://hooks.example/x");
            jail.set_env("OUTPOST_NOTIFICATION_AUTHORIZATION", "Bearer a\u{7}b");
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(e.contains("not a valid HTTP header value"), "{e}");
            jail.set_env("OUTPOST_NOTIFICATION_AUTHORIZATION", "Bearer ok");
            Config::load(&args()).map_err(|e| e.to_string())?;
            jail.set_env("OUTPOST_NOTIFICATION_URL", "http://127.0.0.1:9/hook");
            jail.set_env(
                "OUTPOST_CONNECTION_STRING",
                "ConnectedRegistryName=site;SyncTokenName=site;SyncTokenPassword=x;ParentGatewayEndpoint=root:5000;ParentEndpointProtocol=http",
            );
            let e = Config::load(&args()).unwrap_err().to_string();
            assert!(e.contains("for the root registry"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn file_env_and_flags_layer() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "listen = \"127.0.0.1:6000\"\nlog_level = \"debug\"\n",
            )?;
            jail.set_env("OUTPOST_DATA_DIR", "/tmp/x");
            let mut a = args();
            a.config = Some("c.toml".into());
            let c = Config::load(&a).map_err(|e| e.to_string())?;
            assert_eq!(c.listen.port(), 6000);
            assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
            assert_eq!(c.log_level, "debug");
            a.log_level = Some("warn".into());
            assert_eq!(
                Config::load(&a).map_err(|e| e.to_string())?.log_level,
                "warn"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "lisen = \"127.0.0.1:6000\"\n")?;
            let mut a = args();
            a.config = Some("c.toml".into());
            let e = format!("{:#}", Config::load(&a).unwrap_err());
            assert!(e.contains("lisen"), "{e}");
            jail.create_file("d.toml", "")?;
            jail.set_env("OUTPOST_LISTEN", "nonsense");
            a.config = Some("d.toml".into());
            let e = format!("{:#}", Config::load(&a).unwrap_err());
            assert!(e.contains("LISTEN") && e.contains("OUTPOST_"), "{e}");
            jail.set_env("OUTPOST_LISTEN", "127.0.0.1:6000");
            jail.set_env("OUTPOST_LISEN", "127.0.0.1:6000");
            let e = format!("{:#}", Config::load(&a).unwrap_err());
            assert!(e.contains("OUTPOST_LISEN is not a setting"), "{e}");
            assert!(!e.contains("expected"), "{e}");
            Ok(())
        });
    }
}
