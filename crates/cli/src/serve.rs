//! `outpost serve`: open the data directory, start the HTTP server and the upload reaper, and
//! shut down gracefully on SIGTERM or SIGINT (in-flight requests finish, new ones are refused).

use crate::config::Config;
use anyhow::Context;
use outpost_registry::{Registry, RegistryConfig};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file [env: OUTPOST_CONFIG]
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address to listen on [env: OUTPOST_LISTEN] [default: 0.0.0.0:5000]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory [env: OUTPOST_DATA_DIR] [default: ./outpost-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log level or filter [env: OUTPOST_LOG_LEVEL] [default: info; a connected registry
    /// follows its parent's setting unless this is set]
    #[arg(long)]
    pub log_level: Option<String>,
    /// Run as a connected registry: the connection string from `outpost connected-registry
    /// get-settings` [env: OUTPOST_CONNECTION_STRING, ACR_REGISTRY_CONNECTION_STRING]
    #[arg(long)]
    pub connection_string: Option<String>,
    /// Serve HTTPS with this PEM certificate chain [env: OUTPOST_TLS_CERT]
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert [env: OUTPOST_TLS_KEY]
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// PEM file of CA certificates trusted for an https parent, besides the system's
    /// [env: OUTPOST_PARENT_CA_FILE]
    #[arg(long)]
    pub parent_ca_file: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(&args)?;
    let log = init_logging(&config.log_level, &config.log_format)?;
    raise_open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config, log))
}

/// Every connection, blob being read and upload in flight holds a file descriptor, and the
/// usual soft limit (1024) is reached by a few hundred clients; once it is, new connections
/// wait in the kernel's queue until old ones close. So the soft limit is raised to the hard
/// one, as the Go runtime does for `docker-registry`. Logged, since it bounds how many clients
/// one process can serve.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => tracing::warn!(
            open_files = n,
            "the open-files limit is low: each client connection needs one; raise the hard \
             limit (ulimit -Hn, LimitNOFILE= in a systemd unit, --ulimit nofile= for docker)"
        ),
        Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}

/// Changes the log filter of the running process.
type LogHandle = tracing_subscriber::reload::Handle<
    tracing_subscriber::filter::Targets,
    tracing_subscriber::Registry,
>;

/// Turns a configured log level into a `tracing` filter. Accepts the usual levels, ACR's
/// connected-registry names (`Debug`, `Information`, `Warning`, `Error`, `None`), or a full
/// filter directive list such as `info,outpost_server=debug`.
pub(crate) fn log_filter(level: &str) -> anyhow::Result<String> {
    if level.contains(['=', ',', ':']) {
        return Ok(level.to_string());
    }
    let l = match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" | "information" => "info",
        "warn" | "warning" => "warn",
        "error" => "error",
        "off" | "none" => "off",
        _ => anyhow::bail!(
            "log_level {level:?} is not a level: use error, warn, info, debug, trace or off \
             (ACR names Debug, Information, Warning, Error and None work too), or a filter such as \
             \"info,outpost_server=debug\""
        ),
    };
    if l == "off" {
        return Ok(l.into());
    }
    // Keep sqlx's per-statement logging out unless asked for explicitly.
    Ok(format!("{l},sqlx=warn"))
}

/// Logs go to stderr, as text for people or (`log_format = "json"`) one JSON object per line
/// for a log shipper: `timestamp`, `level`, `fields` (with `message`) and `target`.
fn init_logging(level: &str, format: &str) -> anyhow::Result<LogHandle> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(env_filter(level)?);
    let json = format == "json";
    tracing_subscriber::registry()
        .with(filter)
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false)
        }))
        .with(json.then(|| {
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
        }))
        .init();
    Ok(handle)
}

/// The filter for a configured level: `target=level` directives (no span or field filters,
/// which would bring in a regex engine for a feature nobody here uses).
pub(crate) fn env_filter(level: &str) -> anyhow::Result<tracing_subscriber::filter::Targets> {
    let directives = log_filter(level)?;
    directives.parse().with_context(|| {
        format!(
            "log_level {level:?} is not a valid level or filter (target=level, comma-separated)"
        )
    })
}

/// The file in a data directory that says its metadata lives in PostgreSQL.
const DATABASE_MARKER: &str = "database";

/// Refuses a data directory that belongs to another role or registry (`serve`, and
/// `outpost config`, which refuses what `serve` would).
pub(crate) fn check_data_dir_owner(config: &Config) -> anyhow::Result<()> {
    // Its metadata is in PostgreSQL: without the URL the registry would start empty on a new
    // SQLite database, and garbage collection would take every blob for an orphan.
    if config.database_url.is_none() && config.data_dir.join(DATABASE_MARKER).exists() {
        anyhow::bail!(
            "the data directory {} keeps its metadata in PostgreSQL: start it with database_url \
             (OUTPOST_DATABASE_URL); without it this registry would start empty on a new SQLite \
             database beside the blobs (remove the file {} only if that database is gone for good)",
            config.data_dir.display(),
            config.data_dir.join(DATABASE_MARKER).display()
        );
    }
    // The metadata database lost (deleted, or cut to nothing by a disk or an operator) beside
    // what a registry left: a start would make a new, empty one and serve an empty registry
    // beside the old blobs, and a connected registry would lose its place in its own event
    // log (its outbox cursor then points past events it will never send up).
    let meta = config.data_dir.join("meta.db");
    let lost = match std::fs::metadata(&meta) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing"),
        Ok(m) if m.len() == 0 => Some("empty"),
        _ => None,
    };
    // (Not `blob-store`: a first start that failed, at an object store say, leaves that
    // record and nothing else.)
    let blob_file = || {
        let sha = config.data_dir.join("blobs").join("sha256");
        std::fs::read_dir(sha).ok().is_some_and(|dirs| {
            dirs.flatten().any(|d| {
                std::fs::read_dir(d.path())
                    .ok()
                    .is_some_and(|mut files| files.next().is_some())
            })
        })
    };
    if config.database_url.is_none()
        && let Some(lost) = lost
        && let Some(left) = ["keys/access-token.key", "sync/instance-id"]
            .into_iter()
            .find(|f| config.data_dir.join(f).exists())
            .or_else(|| blob_file().then_some("blobs"))
    {
        anyhow::bail!(
            "the data directory {} was used before (it holds {left}), but its metadata \
             database {} is {lost}: starting would serve an empty registry beside the old \
             blobs. Restore meta.db from a backup (docs/storage-layout.md, \"Backing up and \
             restoring\"), or start on an empty data directory (a connected registry fetches \
             everything again from its parent; a ReadWrite one loses what it had not sent up)",
            config.data_dir.display(),
            meta.display(),
        );
    }
    // A connected registry's directory started without its connection string would take
    // pushes as a root that its parent never sees (and a ReadOnly one would then serve tags
    // its parent does not have).
    if config.connection_string.is_none()
        && config.upstream_url.is_none()
        && let Some(owner) = outpost_sync::saved_owner(&config.data_dir)
    {
        anyhow::bail!(
            "the data directory {} belongs to {}: start it with {} (it was started without)",
            config.data_dir.display(),
            match owner.as_str() {
                "mirror" => "a mirror of a plain registry".to_string(),
                name => format!("connected registry {name:?}"),
            },
            match owner.as_str() {
                "mirror" => "upstream_url (OUTPOST_UPSTREAM_URL)",
                _ =>
                    "its connection string (--connection-string, OUTPOST_CONNECTION_STRING or ACR_REGISTRY_CONNECTION_STRING)",
            }
        );
    }
    // Another connected registry's directory: refused before anything in it changes.
    if let Some(cs) = &config.connection_string
        && let Ok(cs) = outpost_control::ConnectionString::parse(cs)
        && let Some(owner) = outpost_sync::saved_owner(&config.data_dir)
        && owner != cs.connected_registry_name
    {
        anyhow::bail!(
            "the data directory {} belongs to connected registry {owner:?}, but the connection \
             string names {:?}; use that registry's data directory",
            config.data_dir.display(),
            cs.connected_registry_name
        );
    }
    Ok(())
}

async fn serve(config: Config, log: LogHandle) -> anyhow::Result<()> {
    // One process per data directory: a second server, or an import, is refused.
    let _lock = crate::bundle::lock_data_dir(&config.data_dir)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    check_data_dir_owner(&config)?;
    let certificate = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::Certificate::load(cert, key)?),
        _ => None,
    };
    let tls = certificate
        .clone()
        .map(crate::tls::server_config)
        .transpose()?;
    reload_on_hangup(certificate);
    let parent_ca = match &config.parent_ca_file {
        Some(path) => Some(outpost_sync::ParentCa::load(path)?),
        None => None,
    };
    let registry = Registry::open(
        &config.data_dir,
        RegistryConfig {
            max_manifest_bytes: config.max_manifest_bytes,
            max_blob_bytes: (config.max_blob_bytes > 0).then_some(config.max_blob_bytes),
            fsync: true,
            blob_store: config.blob_store.clone(),
            database_url: config.database_url.clone(),
            // Stored as `scheme://host:port`, the form other replicas compare and dial.
            replica_url: config
                .replica_url
                .as_deref()
                .map(|u| u.trim_end_matches('/').to_string()),
            ..RegistryConfig::default()
        },
    )
    .await
    .with_context(|| match &config.database_url {
        Some(url) => format!(
            "opening data directory {} with the metadata database {}",
            config.data_dir.display(),
            outpost_meta::redact_url(url)
        ),
        None => format!("opening data directory {}", config.data_dir.display()),
    })?;
    if config.database_url.is_some() {
        // Remembered, so that a start without the URL is refused instead of running an empty
        // registry on a new SQLite database next to the blobs (check_data_dir_owner).
        let marker = config.data_dir.join(DATABASE_MARKER);
        if !marker.exists() {
            std::fs::write(&marker, "postgresql\n")
                .with_context(|| format!("writing {}", marker.display()))?;
        }
    }

    let control = outpost_control::Control::open(
        registry.meta().clone(),
        &config.data_dir,
        outpost_control::ControlConfig {
            limits: outpost_control::Limits {
                max_tokens: config.max_tokens,
                max_scope_maps: config.max_scope_maps,
                max_repository_rules: config.max_repository_rules,
            },
            connected: config.connected_limits()?,
            // A connected registry's descendants are managed at the root.
            managed_at_root: config
                .connection_string
                .as_deref()
                .and_then(|cs| outpost_control::ConnectionString::parse(cs).ok())
                .map(|cs| cs.connected_registry_name),
            ..Default::default()
        },
    )
    .await
    .context("opening access control")?;
    let control = std::sync::Arc::new(control);

    // After the checks that refuse a start on another registry's data directory or on
    // unreadable TLS or CA files: such a start leaves the administrator's password as it was.
    if let Some(password) = control
        .bootstrap_admin(config.admin_password.as_deref())
        .await
        .context("creating the administrator token")?
    {
        // Shown once, on the first start only; it is stored as a hash.
        eprintln!(
            "\nCreated the administrator token.\n  username: admin\n  password: {password}\n\
             Save it now: it is not shown again. Log in with `docker login <host> -u admin`.\n\
             (Set OUTPOST_ADMIN_PASSWORD to choose the password instead.)\n"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, data_dir = %config.data_dir.display(), blobs = %registry.blob_store(), version = outpost_registry::version(), "outpost listening");

    let sync = match &config.connection_string {
        None if config.upstream_url.is_some() => {
            let url = config.upstream_url.clone().unwrap_or_default();
            let credentials = match (&config.upstream_username, &config.upstream_password) {
                (Some(u), Some(p)) => Some((u.clone(), p.clone())),
                _ => None,
            };
            Some(
                outpost_sync::start_mirror(
                    outpost_sync::MirrorOptions {
                        url,
                        repositories: config.upstream_repositories.clone(),
                        credentials,
                        data_dir: config.data_dir.clone(),
                        interval: Duration::from_secs(config.upstream_poll_secs),
                        parent_ca: parent_ca.clone(),
                        read_timeout: Duration::from_secs(config.sync_read_timeout_secs),
                    },
                    registry.clone(),
                    control.clone(),
                )
                .await?,
            )
        }
        None => None,
        Some(cs) => {
            let cs = outpost_control::ConnectionString::parse(cs)
                .context("invalid connection string")?;
            let started = outpost_sync::start(
                outpost_sync::ChildOptions {
                    connection_string: cs,
                    data_dir: config.data_dir.clone(),
                    // A wildcard listen address reaches no one: then only an explicit
                    // login_server is reported.
                    login_server: config.login_server.clone().unwrap_or_else(|| {
                        if addr.ip().is_unspecified() {
                            String::new()
                        } else {
                            addr.to_string()
                        }
                    }),
                    poll_wait: Duration::from_secs(config.sync_poll_secs),
                    parent_ca: parent_ca.clone(),
                    read_timeout: Duration::from_secs(config.sync_read_timeout_secs),
                    // The parent's log level applies unless the operator set one here.
                    log_level_hook: (!config.log_level_explicit).then(|| {
                        let hook: outpost_sync::LogLevelHook = std::sync::Arc::new(move |level| {
                            let filter = env_filter(level).map_err(|e| format!("{e:#}"))?;
                            log.reload(filter).map_err(|e| e.to_string())
                        });
                        hook
                    }),
                },
                registry.clone(),
                control.clone(),
            )
            .await?;
            Some(started)
        }
    };
    let read_only = sync.as_ref().is_some_and(|s| s.read_only);
    let sync_scope = sync.as_ref().and_then(|s| s.scope.clone());

    // Replicas sharing a PostgreSQL database follow each other's writes.
    let follower = (registry.meta().backend() == outpost_meta::Backend::Postgres)
        .then(|| tokio::spawn(follow_replicas(registry.clone(), control.clone())));
    if registry.meta().backend() == outpost_meta::Backend::Postgres {
        check_same_service(&registry, &config.service).await;
    }
    let reaper = tokio::spawn(reap_uploads(
        registry.clone(),
        Duration::from_secs(config.upload_max_age_secs),
        config.data_dir.clone(),
    ));
    let headroom = tokio::spawn(keep_headroom(registry.clone()));
    let trimmer = tokio::spawn(crate::memory::give_back_freed_memory());
    // A connected registry collects garbage as its parent configures; others as configured here.
    let gc_setting = match sync.as_ref().and_then(|s| s.gc.clone()) {
        Some(rx) => rx,
        None => {
            tokio::sync::watch::channel(outpost_control::connected::GarbageCollection {
                enabled: config.gc_enabled,
                schedule: config.gc_schedule.clone(),
            })
            .1
        }
    };
    let pruner = tokio::spawn(prune_event_log(
        control.clone(),
        registry.metrics().clone(),
        // A connected registry keeps what it has still to send up (its ReadWrite clients'
        // changes, its notifications) until its parent has it.
        sync.as_ref()
            .map(|s| (config.data_dir.clone(), !s.read_only)),
    ));
    let webhook = config.notification_url.clone().map(|url| {
        tokio::spawn(crate::webhook::deliver(
            control.clone(),
            registry.metrics().clone(),
            url,
            config.notification_authorization.clone(),
        ))
    });
    let watcher = tokio::spawn(watch_fleet(control.clone()));
    let clock_watch = tokio::spawn(watch_clock());
    let gc_min_age = Duration::from_secs(config.gc_min_age_secs);
    let collector = tokio::spawn(collect_garbage(registry.clone(), gc_setting, gc_min_age));
    let app = outpost_server::router(outpost_server::AppState {
        registry: registry.clone(),
        control: control.clone(),
        auth: outpost_server::AuthSettings {
            anonymous_pull: config.anonymous_pull,
            service: config.service.clone(),
            tls: tls.is_some(),
            public_url: config.public_url.clone(),
        },
        read_only,
        sync_scope,
        gc_min_age,
        metrics_enabled: config.metrics_enabled,
        // Without credentials a URL might carry: it is shown to clients.
        upstream: config
            .upstream_url
            .as_deref()
            .map(|u| match reqwest::Url::parse(u) {
                Ok(mut url) => {
                    let _ = url.set_username("");
                    let _ = url.set_password(None);
                    url.as_str().trim_end_matches('/').to_string()
                }
                Err(_) => u.to_string(),
            }),
    });
    // A replica whose replica_url leads elsewhere would have uploads started here looked
    // for elsewhere: it stops, saying so, once the check has an answer.
    let (fatal_tx, fatal_rx) = tokio::sync::watch::channel(None::<String>);
    let mut fatal_wait = fatal_rx.clone();
    let address_check = config.replica_url.clone().map(|url| {
        tokio::spawn(async move {
            if let Err(e) = outpost_server::verify_own_address(&url).await {
                tracing::error!("{e}");
                let _ = fatal_tx.send(Some(e));
            }
        })
    });
    let waker = registry.clone();
    // This node's own sync stops first: the wake-ups below would otherwise end its waits too.
    let sync_task = sync.as_ref().map(|s| s.task.abort_handle());
    let (stopped_tx, mut stopped) = tokio::sync::watch::channel(false);
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            // A check that passed (or none) closes the channel: then only signals stop it.
            Ok(_) = fatal_wait.wait_for(Option::is_some) => {}
        }
        if let Some(t) = sync_task {
            t.abort();
        }
        // Children's long-polls (up to a minute) answer now, and so do any that arrive on
        // connections still open, instead of holding up the stop; until the server is done.
        tokio::spawn(async move {
            loop {
                waker.wake_waiters();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stopped.changed() => return,
                }
            }
        });
    };
    match tls {
        Some(tls) => outpost_server::serve(crate::tls::TlsListener::new(listener, tls)?, app, stop)
            .await
            .context("serving HTTPS")?,
        None => outpost_server::serve(crate::listen::PlainListener::new(listener), app, stop)
            .await
            .context("serving HTTP")?,
    }
    let _ = stopped_tx.send(true);
    reaper.abort();
    headroom.abort();
    trimmer.abort();
    if let Some(f) = follower {
        f.abort();
    }
    pruner.abort();
    watcher.abort();
    clock_watch.abort();
    if let Some(w) = webhook {
        w.abort();
    }
    collector.abort();
    if let Some(s) = sync {
        s.task.abort();
    }
    if let Some(c) = address_check {
        c.abort();
    }
    registry.close().await;
    let fatal = fatal_rx.borrow().clone();
    if let Some(e) = fatal {
        anyhow::bail!(e);
    }
    tracing::info!("outpost stopped");
    Ok(())
}

/// How often a replica looks for the other replicas' writes in the shared database.
const REPLICA_POLL: Duration = Duration::from_millis(200);

/// At a replica sharing a PostgreSQL database with others: every [`REPLICA_POLL`], reads the
/// newest event's number and the access-change count. New events drop the manifests cached
/// for their repositories and wake the message feed's long-polls (a push at another replica
/// reaches the children connected here); an access change drops cached identities and
/// verified passwords (a token disabled elsewhere stops working here too).
async fn follow_replicas(registry: Registry, control: std::sync::Arc<outpost_control::Control>) {
    const PAGE: u32 = 1000;
    let meta = registry.meta().clone();
    let mut seen = meta.shared_positions().await.ok();
    let mut failing = false;
    let mut tick = tokio::time::interval(REPLICA_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = match meta.shared_positions().await {
            Ok(p) => p,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the shared metadata database; other replicas' changes are not seen until it answers");
                    failing = true;
                }
                continue;
            }
        };
        if failing {
            tracing::info!("the shared metadata database answers again");
            failing = false;
        }
        let Some((seq, access)) = seen else {
            // Nothing was read before: whatever was cached may be stale.
            control.reload();
            registry.changed_elsewhere(None);
            seen = Some(now);
            continue;
        };
        if now.1 != access {
            control.reload();
        }
        if now.0 != seq {
            let repos = match meta.events_after(seq, PAGE).await {
                Ok(events) if now.0 > seq && events.len() < PAGE as usize => {
                    let names: std::collections::BTreeSet<String> =
                        events.into_iter().map(|e| e.repo).collect();
                    Some(names.into_iter().collect::<Vec<_>>())
                }
                // Many changes, a log that went backwards (restored), or an error: drop all.
                _ => None,
            };
            registry.changed_elsewhere(repos.as_deref());
        }
        seen = Some(now);
    }
}

async fn reap_uploads(registry: Registry, age: Duration, data_dir: PathBuf) {
    let period = (age / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        // A connected registry's partial downloads are kept while it may still resume them.
        let keep = outpost_sync::resumable_uploads(&data_dir);
        if let Err(e) = registry.reap_uploads(age, &keep).await {
            tracing::warn!(error = %e, "reaping stale uploads failed; will retry");
        }
        tokio::time::sleep(period).await;
    }
}

/// How often the data directory's disk is checked for room.
const HEADROOM_EVERY: Duration = Duration::from_secs(10);

/// Keeps room for deletes on a full disk, and reports running out (see
/// [`Registry::keep_headroom`]).
async fn keep_headroom(registry: Registry) {
    let mut short = false;
    loop {
        short = registry.keep_headroom(short).await;
        tokio::time::sleep(HEADROOM_EVERY).await;
    }
}

/// How often the event log is pruned (the first time a minute after start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Deletes events no child can still ask for (older than the longest message TTL), so the
/// log does not grow without bound, and notifications kept longer than
/// `outpost_control::notify::KEEP`. `site` is a connected registry's data directory and whether
/// it is ReadWrite: what it has still to send up stays.
/// Replicas must name the same `service`: an access token one issues names it, and another
/// refuses a token for another service. Each records a fingerprint of its own in the shared
/// database at start, and warns when it finds another there (so does the other when it next
/// starts). Only a warning: changing the service of every replica, one at a time, must work.
async fn check_same_service(registry: &Registry, service: &str) {
    const KEY: &str = "service_fingerprint";
    let digest = outpost_oci::Digest::sha256_of(service.as_bytes());
    let Ok(mine) = i64::from_str_radix(&digest.hex()[..15], 16) else {
        return;
    };
    match registry.meta().log_state(KEY).await {
        Ok(Some(other)) if other != mine => tracing::warn!(
            service,
            "another replica sharing this database started with a different `service`: an \
             access token issued by one is refused by the other (\"access token is for …, not \
             this registry\"), so logins through a load balancer fail at random; give every \
             replica the same service"
        ),
        _ => {}
    }
    if let Err(e) = registry.meta().set_log_state(KEY, mine).await {
        tracing::debug!(error = %e, "could not record this replica's service");
    }
}

/// Says when the system clock jumps (set by hand, NTP or GPS coming back after weeks): the
/// ages of upload sessions and of unreferenced blobs are measured by it, so a jump forward
/// can end an upload under way, and a jump back delays collection.
async fn watch_clock() {
    const EVERY: Duration = Duration::from_secs(60);
    const JUMP_MS: i64 = 5 * 60_000;
    let mut wall = outpost_control::clock::system_ms();
    let mut mono = std::time::Instant::now();
    loop {
        tokio::time::sleep(EVERY).await;
        let (now_wall, now_mono) = (
            outpost_control::clock::system_ms(),
            std::time::Instant::now(),
        );
        let jump = (now_wall - wall) - now_mono.duration_since(mono).as_millis() as i64;
        if jump.abs() >= JUMP_MS {
            tracing::warn!(
                now = %outpost_control::format_rfc3339(now_wall),
                "the system clock jumped {} by {}: upload sessions and unreferenced blobs are \
                 aged by it, so an upload under way may have to start again",
                if jump > 0 { "forward" } else { "back" },
                outpost_control::clock::human_offset(jump)
            );
        }
        (wall, mono) = (now_wall, now_mono);
    }
}

/// Logs the connected registries below this node going `Offline` or `Unhealthy`, and coming
/// back: their state is derived when asked, so nothing else would say so unless someone asks.
/// The first look waits a little, for children to reconnect after this node restarts.
async fn watch_fleet(control: std::sync::Arc<outpost_control::Control>) {
    let mut watch = outpost_control::watch::FleetWatch::default();
    tokio::time::sleep(Duration::from_secs(20)).await;
    loop {
        match control.list_connected_registries(None, false).await {
            Ok(list) => {
                for change in watch.observe(&list) {
                    if change.is_problem() {
                        tracing::warn!("{change}");
                    } else {
                        tracing::info!("{change}");
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not read the connected registries' health")
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

async fn prune_event_log(
    control: std::sync::Arc<outpost_control::Control>,
    metrics: outpost_registry::metrics::Metrics,
    site: Option<(PathBuf, bool)>,
) {
    tokio::time::sleep(Duration::from_secs(60)).await;
    loop {
        let unsent_after = match &site {
            None => Ok(None),
            Some((dir, read_write)) => outpost_sync::unsent_after(dir, *read_write),
        };
        match unsent_after {
            Err(e) => {
                tracing::warn!(error = %e, "not pruning the event log: a sync cursor cannot be read")
            }
            Ok(unsent_after) => match control.prune_event_log(unsent_after).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics.events_pruned(n);
                    tracing::info!(deleted = n, "pruned the event log");
                }
                Err(e) => tracing::warn!(error = %e, "pruning the event log failed; will retry"),
            },
        }
        match control.prune_notifications().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "pruned old notifications"),
            Err(e) => tracing::warn!(error = %e, "pruning notifications failed; will retry"),
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}

/// Runs garbage collection at each occurrence of the schedule while it is enabled, following
/// changes to the setting (a connected registry's parent may change it at any sync).
async fn collect_garbage(
    registry: Registry,
    mut setting: tokio::sync::watch::Receiver<outpost_control::connected::GarbageCollection>,
    min_age: Duration,
) {
    let mut following = true;
    loop {
        let current = setting.borrow_and_update().clone();
        let next = current
            .enabled
            .then(|| outpost_control::connected::time_until_next(&current.schedule))
            .flatten();
        let wait = async {
            match next {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let change = async {
            if !following || setting.changed().await.is_err() {
                // The sender is gone (sync stopped): the last setting stays.
                following = false;
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = wait => {
                if let Err(e) = registry.collect_garbage(min_age, false).await {
                    tracing::warn!(error = %e, "garbage collection failed; it runs again at the next scheduled time");
                }
            }
            () = change => {}
        }
    }
}

/// `SIGHUP` reads the TLS certificate and key again (a renewed certificate is served to new
/// connections without a restart), instead of ending the process as it would by default.
fn reload_on_hangup(certificate: Option<std::sync::Arc<crate::tls::Certificate>>) {
    #[cfg(unix)]
    {
        let mut hangups =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP");
                    return;
                }
            };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match &certificate {
                    None => tracing::info!(
                        "SIGHUP: nothing to reload (no TLS certificate); the other settings \
                         take effect at the next start"
                    ),
                    Some(c) => match c.reload() {
                        Ok(()) => tracing::info!(
                            cert = %c.paths().0.display(),
                            "SIGHUP: reloaded the TLS certificate and key; new connections get them"
                        ),
                        Err(e) => tracing::warn!(
                            error = format!("{e:#}"),
                            "SIGHUP: reloading the TLS certificate failed; still serving the \
                             previous one"
                        ),
                    },
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = certificate;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn log_levels() {
        assert_eq!(log_filter("Information").unwrap(), "info,sqlx=warn");
        assert_eq!(log_filter("None").unwrap(), "off", "None silences sqlx too");
        assert_eq!(log_filter("debug").unwrap(), "debug,sqlx=warn");
        assert_eq!(
            log_filter("info,outpost_server=debug").unwrap(),
            "info,outpost_server=debug"
        );
        let e = log_filter("loud").unwrap_err().to_string();
        assert!(e.contains("\"loud\"") && e.contains("Information"), "{e}");
        // Every level and directive list becomes a working filter; nonsense is refused.
        for l in [
            "Debug",
            "Information",
            "Warning",
            "Error",
            "None",
            "trace",
            "info,a::b=debug",
        ] {
            super::env_filter(l).unwrap();
        }
        assert!(super::env_filter("info,outpost=loudest").is_err());
    }
}
