//! `outpost scope-map …` and `outpost token …`: the `az acr scope-map` and `az acr token`
//! commands, flags and messages, over the management API.

use crate::client::{Client, Connection, HttpStatus, Output, confirm, print_rows, query_escape};
use anyhow::bail;
use clap::{ArgAction, ArgMatches, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

fn rules(kind: &str, groups: &[Vec<String>]) -> anyhow::Result<Vec<String>> {
    let flag = if kind == "repositories" {
        "--repository"
    } else {
        "--gateway"
    };
    let mut out = Vec::new();
    for g in groups {
        let Some((resource, actions)) = g.split_first() else {
            continue;
        };
        if actions.is_empty() {
            bail!("At least one action must be specified with {flag} {resource}.");
        }
        for a in actions {
            out.push(format!(
                "{kind}/{}/{}",
                resource.to_lowercase(),
                a.to_lowercase()
            ));
        }
    }
    Ok(out)
}

#[derive(Subcommand, Debug)]
pub enum ScopeMapCmd {
    /// Create a scope map.
    #[command(
        after_help = "Example (pull from every repository under team/, push to team/app):
    outpost scope-map create -n team-rights --repository 'team/*' content/read metadata/read \\
      --repository team/app content/write"
    )]
    Create {
        /// Name of the scope map
        #[arg(long, short = 'n')]
        name: String,
        /// Repository and actions: --repository REPO ACTION... (repeatable)
        #[arg(long, num_args = 2.., action = ArgAction::Append, value_names = ["REPO", "ACTION"])]
        repository: Vec<String>,
        /// Connected registry and actions: --gateway NAME ACTION... (repeatable)
        #[arg(long, num_args = 2.., action = ArgAction::Append, value_names = ["NAME", "ACTION"])]
        gateway: Vec<String>,
        /// Free text describing the scope map
        #[arg(long)]
        description: Option<String>,
    },
    /// Add or remove rules, or change the description.
    Update {
        /// Name of the scope map
        #[arg(long, short = 'n')]
        name: String,
        /// Repository and actions to add: --add REPO ACTION... (repeatable)
        #[arg(long, visible_alias = "add", num_args = 2.., action = ArgAction::Append, value_names = ["REPO", "ACTION"])]
        add_repository: Vec<String>,
        /// Repository and actions to remove: --remove REPO ACTION... (repeatable)
        #[arg(long, visible_alias = "remove", num_args = 2.., action = ArgAction::Append, value_names = ["REPO", "ACTION"])]
        remove_repository: Vec<String>,
        /// Connected registry and gateway actions to add: --add-gateway NAME ACTION...
        #[arg(long, num_args = 2.., action = ArgAction::Append, value_names = ["NAME", "ACTION"])]
        add_gateway: Vec<String>,
        /// Connected registry and gateway actions to remove: --remove-gateway NAME ACTION...
        #[arg(long, num_args = 2.., action = ArgAction::Append, value_names = ["NAME", "ACTION"])]
        remove_gateway: Vec<String>,
        /// Free text describing the scope map
        #[arg(long)]
        description: Option<String>,
    },
    /// Show one scope map.
    Show {
        /// Name of the scope map
        #[arg(long, short = 'n')]
        name: String,
    },
    /// List scope maps.
    List,
    /// Delete a scope map.
    Delete {
        /// Name of the scope map
        #[arg(long, short = 'n')]
        name: String,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token (and, with --repository/--gateway, its scope map <token>-scope-map).
    #[command(after_help = "Examples:
  A pull-only token whose passwords expire in 90 days:
    outpost token create -n crew-token --repository app content/read --expiration-in-days 90
  A token with the rights of an existing scope map:
    outpost token create -n ci-token --scope-map team-rights")]
    Create {
        /// Name of the token
        #[arg(long, short = 'n')]
        name: String,
        /// Scope map that gives the token its rights
        #[arg(long, conflicts_with_all = ["repository", "gateway"])]
        scope_map: Option<String>,
        /// Repository and actions: --repository REPO ACTION... (repeatable; makes scope map <token>-scope-map)
        #[arg(long, num_args = 2.., action = ArgAction::Append, value_names = ["REPO", "ACTION"])]
        repository: Vec<String>,
        /// Connected registry and actions: --gateway NAME ACTION... (repeatable)
        #[arg(long, num_args = 2.., action = ArgAction::Append, value_names = ["NAME", "ACTION"])]
        gateway: Vec<String>,
        /// enabled or disabled (a disabled token authenticates nowhere, also at connected registries)
        #[arg(long, value_parser = ["enabled", "disabled"], ignore_case = true, default_value = "enabled")]
        status: String,
        /// Create the token without passwords (generate them later with `token credential generate`)
        #[arg(long, conflicts_with_all = ["expiration_in_days", "expiration"])]
        no_passwords: bool,
        /// Passwords expire after this many days (default: never)
        #[arg(
            long,
            visible_alias = "days",
            conflicts_with = "expiration",
            allow_negative_numbers = true
        )]
        expiration_in_days: Option<i64>,
        /// Expiry as YYYY-MM-DDTHH:MM:SSZ
        #[arg(long)]
        expiration: Option<String>,
    },
    /// Change a token's scope map or status.
    Update {
        /// Name of the token
        #[arg(long, short = 'n')]
        name: String,
        /// Scope map that gives the token its rights
        #[arg(long)]
        scope_map: Option<String>,
        /// enabled or disabled (a disabled token authenticates nowhere, also at connected registries)
        #[arg(long, value_parser = ["enabled", "disabled"], ignore_case = true)]
        status: Option<String>,
    },
    /// Show one token.
    Show {
        /// Name of the token
        #[arg(long, short = 'n')]
        name: String,
    },
    /// List tokens.
    List,
    /// Delete a token.
    Delete {
        /// Name of the token
        #[arg(long, short = 'n')]
        name: String,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Manage a token's passwords.
    #[command(subcommand)]
    Credential(CredentialCmd),
}

#[derive(Subcommand, Debug)]
pub enum CredentialCmd {
    /// Generate new password1 and/or password2 (shown once).
    Generate {
        /// Name of the token
        #[arg(long, short = 'n')]
        name: String,
        /// Password 1
        #[arg(long)]
        password1: bool,
        /// Password 2
        #[arg(long)]
        password2: bool,
        /// Passwords expire after this many days (default: never)
        #[arg(
            long,
            visible_alias = "days",
            conflicts_with = "expiration",
            allow_negative_numbers = true
        )]
        expiration_in_days: Option<i64>,
        /// Expiry as YYYY-MM-DDTHH:MM:SSZ
        #[arg(long)]
        expiration: Option<String>,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Delete password1 and/or password2.
    Delete {
        /// Name of the token
        #[arg(long, short = 'n')]
        name: String,
        /// Password 1
        #[arg(long)]
        password1: bool,
        /// Password 2
        #[arg(long)]
        password2: bool,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// When `token` is a connected registry's sync token, a warning (with a leading space) that
/// its instances stop syncing, for the prompt; with `--yes` (no prompt), printed to stderr.
async fn sync_token_warning(c: &Client, token: &str, yes: bool) -> String {
    let Ok(Some(list)) = c.call(Method::GET, "/connected-registries", None).await else {
        return String::new();
    };
    let users: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["syncToken"].as_str() == Some(token))
        .filter_map(|r| r["name"].as_str())
        .collect();
    if users.is_empty() {
        return String::new();
    }
    let warning = format!(
        " It is the sync token of connected registry {}: instances configured with the old password will stop syncing until they get a new connection string (`outpost connected-registry get-settings -n {} --generate-password 1` makes one).",
        users.join(", "),
        users[0]
    );
    if yes {
        eprintln!("Warning:{warning}");
    }
    warning
}

/// Longest `--expiration-in-days`: 100 years (leave it out for passwords that never expire).
const MAX_EXPIRATION_DAYS: i64 = 36_500;

/// The expiry fields of a request: `expiry` for a date, `expiryInDays` for a number of days,
/// which the registry counts by its own clock (this machine's may be off).
fn expiry(days: Option<i64>, at: Option<String>) -> anyhow::Result<Option<(&'static str, Value)>> {
    if let Some(at) = at {
        outpost_control::parse_rfc3339(&at).map_err(|e| anyhow::anyhow!("--expiration: {e}"))?;
        return Ok(Some(("expiry", json!(at))));
    }
    match days {
        Some(d) if d < 1 => bail!(
            "--expiration-in-days must be at least 1, not {d} (leave it out for passwords that do not expire)"
        ),
        Some(d) if d > MAX_EXPIRATION_DAYS => bail!(
            "--expiration-in-days is at most {MAX_EXPIRATION_DAYS} (100 years), not {d} (leave it out for passwords that do not expire)"
        ),
        _ => {}
    }
    Ok(days.map(|d| ("expiryInDays", json!(d))))
}

fn slots(p1: bool, p2: bool) -> Vec<&'static str> {
    match (p1, p2) {
        (true, false) => vec!["password1"],
        (false, true) => vec!["password2"],
        _ => vec!["password1", "password2"],
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints `items` as JSON when `--output json` or `--query` asks for it (one object for
/// commands about one item, an array for `list`); false leaves the table to the caller.
fn print_answer(conn: &Connection, items: &[Value], single: bool) -> anyhow::Result<bool> {
    let v = if single {
        items.first().cloned().unwrap_or(Value::Null)
    } else {
        Value::from(items.to_vec())
    };
    conn.print_generic(&v)
}

fn print_scope_maps(conn: &Connection, items: &[Value]) -> anyhow::Result<()> {
    print_scope_maps_as(conn, items, true)
}

fn print_scope_maps_as(conn: &Connection, items: &[Value], single: bool) -> anyhow::Result<()> {
    if print_answer(conn, items, single)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|m| {
            let actions: Vec<String> = m["actions"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            vec![
                s(&m["name"]),
                s(&m["creationDate"]),
                s(&m["description"]),
                actions.join(", "),
            ]
        })
        .collect();
    print_rows(
        conn.output,
        &["NAME", "CREATION DATE", "DESCRIPTION", "ACTIONS"],
        &rows,
    );
    Ok(())
}

fn print_tokens(conn: &Connection, items: &[Value]) -> anyhow::Result<()> {
    print_tokens_as(conn, items, true)
}

fn print_tokens_as(conn: &Connection, items: &[Value], single: bool) -> anyhow::Result<()> {
    if print_answer(conn, items, single)? {
        return Ok(());
    }
    let expiry = |t: &Value, n: &str| {
        t["passwords"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == n))
            .map(|p| {
                if p["expiry"].is_null() {
                    "never".to_string()
                } else {
                    s(&p["expiry"])
                }
            })
            .unwrap_or_else(|| "-".into())
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|t| {
            vec![
                s(&t["name"]),
                s(&t["scopeMap"]),
                s(&t["status"]),
                s(&t["creationDate"]),
                expiry(t, "password1"),
                expiry(t, "password2"),
            ]
        })
        .collect();
    print_rows(
        conn.output,
        &[
            "NAME",
            "SCOPE MAP",
            "STATUS",
            "CREATION DATE",
            "PASSWORD1 EXPIRY",
            "PASSWORD2 EXPIRY",
        ],
        &rows,
    );
    // Freshly generated passwords are shown once, after the table.
    for t in items {
        for p in t["passwords"].as_array().into_iter().flatten() {
            if let Some(v) = p["value"].as_str() {
                match conn.output {
                    Output::Tsv => println!("{}\t{v}", s(&p["name"])),
                    _ => println!("{}: {v}", s(&p["name"])),
                }
            }
        }
    }
    if items.iter().any(|t| {
        t["passwords"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["value"].is_string())
    }) && conn.output == Output::Table
    {
        eprintln!(
            "Save these passwords now: they cannot be shown again (generate new ones with `outpost token credential generate`)."
        );
    }
    Ok(())
}

/// The values of each occurrence of a repeatable multi-value flag (`--repository A x y
/// --repository B z`), which clap's derive flattens.
fn groups(m: &ArgMatches, id: &str) -> Vec<Vec<String>> {
    m.get_occurrences::<String>(id)
        .map(|occ| occ.map(|vals| vals.cloned().collect()).collect())
        .unwrap_or_default()
}

pub async fn scope_map(conn: &Connection, cmd: ScopeMapCmd, m: &ArgMatches) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    match cmd {
        ScopeMapCmd::Create {
            name, description, ..
        } => {
            let mut actions = rules("repositories", &groups(m, "repository"))?;
            actions.extend(rules("gateway", &groups(m, "gateway"))?);
            let v = c
                .call(Method::POST, "/scope-maps", Some(json!({"name": name, "description": description.unwrap_or_default(), "actions": actions})))
                .await?;
            print_scope_maps(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        ScopeMapCmd::Update {
            name, description, ..
        } => {
            let mut add = rules("repositories", &groups(m, "add_repository"))?;
            add.extend(rules("gateway", &groups(m, "add_gateway"))?);
            let mut remove = rules("repositories", &groups(m, "remove_repository"))?;
            remove.extend(rules("gateway", &groups(m, "remove_gateway"))?);
            let mut body = json!({"add": add, "remove": remove});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            let v = c
                .call(Method::PATCH, &format!("/scope-maps/{name}"), Some(body))
                .await?;
            print_scope_maps(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        ScopeMapCmd::Show { name } => {
            let v = c
                .call(Method::GET, &format!("/scope-maps/{name}"), None)
                .await?;
            print_scope_maps(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        ScopeMapCmd::List => {
            let v = c
                .call(Method::GET, "/scope-maps", None)
                .await?
                .unwrap_or(json!([]));
            print_scope_maps_as(
                conn,
                v.as_array().map(Vec::as_slice).unwrap_or_default(),
                false,
            )?;
        }
        ScopeMapCmd::Delete { name, yes } => {
            confirm(
                &format!(
                    "Deleting the scope map '{name}' will remove its permissions with associated tokens. Proceed?"
                ),
                yes,
            )?;
            c.call(Method::DELETE, &format!("/scope-maps/{name}"), None)
                .await?;
        }
    }
    Ok(())
}

pub async fn token(conn: &Connection, cmd: TokenCmd, m: &ArgMatches) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    match cmd {
        TokenCmd::Create {
            name,
            scope_map,
            status,
            no_passwords,
            expiration_in_days,
            expiration,
            ..
        } => {
            let created_map = scope_map.is_none();
            let scope_map = match scope_map {
                Some(sm) => sm,
                None => {
                    let mut actions = rules("repositories", &groups(m, "repository"))?;
                    actions.extend(rules("gateway", &groups(m, "gateway"))?);
                    if actions.is_empty() {
                        bail!(
                            "argument error: either --scope-map or --repository/--gateway must be provided"
                        );
                    }
                    let sm = format!("{name}-scope-map");
                    c.call(
                        Method::POST,
                        "/scope-maps",
                        Some(json!({"name": sm, "description": format!("Created by token: {name}"), "actions": actions})),
                    )
                    .await?;
                    sm
                }
            };
            // As az takes it: `Enabled` is `enabled`.
            let status = status.to_lowercase();
            let mut body = json!({"name": name, "scopeMap": scope_map, "status": status, "noPasswords": no_passwords});
            if let Some((field, value)) = expiry(expiration_in_days, expiration)? {
                body[field] = value;
            }
            let v = match c.call(Method::POST, "/tokens", Some(body)).await {
                Ok(v) => v,
                Err(e) => {
                    if created_map {
                        // Leave nothing half-made behind.
                        let _ = c
                            .call(Method::DELETE, &format!("/scope-maps/{scope_map}"), None)
                            .await;
                    }
                    return Err(e);
                }
            };
            print_tokens(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        TokenCmd::Update {
            name,
            scope_map,
            status,
        } => {
            if scope_map.is_none() && status.is_none() {
                bail!("nothing to update: give --scope-map and/or --status");
            }
            let v = c
                .call(
                    Method::PATCH,
                    &format!("/tokens/{name}"),
                    Some(
                        json!({"scopeMap": scope_map, "status": status.map(|s| s.to_lowercase())}),
                    ),
                )
                .await?;
            print_tokens(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        TokenCmd::Show { name } => {
            let v = c
                .call(Method::GET, &format!("/tokens/{name}"), None)
                .await?;
            print_tokens(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        TokenCmd::List => {
            let v = c
                .call(Method::GET, "/tokens", None)
                .await?
                .unwrap_or(json!([]));
            print_tokens_as(
                conn,
                v.as_array().map(Vec::as_slice).unwrap_or_default(),
                false,
            )?;
        }
        TokenCmd::Delete { name, yes } => {
            confirm(
                &format!("Are you sure you want to delete the token '{name}'?"),
                yes,
            )?;
            c.call(Method::DELETE, &format!("/tokens/{name}"), None)
                .await?;
        }
        TokenCmd::Credential(CredentialCmd::Generate {
            name,
            password1,
            password2,
            expiration_in_days,
            expiration,
            yes,
        }) => {
            let which = slots(password1, password2);
            confirm(
                &format!(
                    "This will invalidate {} of token '{name}'.{} Continue?",
                    which.join(" and "),
                    sync_token_warning(&c, &name, yes).await
                ),
                yes,
            )?;
            let mut body = json!({"passwords": which});
            if let Some((field, value)) = expiry(expiration_in_days, expiration)? {
                body[field] = value;
            }
            let v = c
                .call(
                    Method::POST,
                    &format!("/tokens/{name}/credentials/generate"),
                    Some(body),
                )
                .await?;
            print_tokens(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
        TokenCmd::Credential(CredentialCmd::Delete {
            name,
            password1,
            password2,
            yes,
        }) => {
            let which = slots(password1, password2);
            confirm(
                &format!(
                    "This will delete {} of token '{name}'.{} Continue?",
                    which.join(" and "),
                    sync_token_warning(&c, &name, yes).await
                ),
                yes,
            )?;
            let v = c
                .call(
                    Method::POST,
                    &format!("/tokens/{name}/credentials/delete"),
                    Some(json!({"passwords": which})),
                )
                .await?;
            print_tokens(conn, &v.into_iter().collect::<Vec<_>>())?;
        }
    }
    Ok(())
}

/// `outpost gc`: garbage collection on demand, through the management API.
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Only report what would be deleted
    #[arg(long)]
    dry_run: bool,
    /// Spare blobs stored or linked in the last this many seconds (default: the server's
    /// gc_min_age_secs)
    #[arg(long, allow_negative_numbers = true)]
    min_age_secs: Option<i64>,
}

pub async fn gc(conn: &Connection, args: GcArgs) -> anyhow::Result<()> {
    if let Some(s) = args.min_age_secs.filter(|s| *s < 0) {
        bail!("--min-age-secs must be 0 or more, not {s}");
    }
    let client = Client::new(conn)?;
    let mut body = serde_json::json!({ "dryRun": args.dry_run });
    if let Some(s) = args.min_age_secs {
        body["minAgeSecs"] = s.into();
    }
    let v = client
        .call(reqwest::Method::POST, "/gc", Some(body))
        .await?
        .unwrap_or_default();
    if conn.print_generic(&v)? {
        return Ok(());
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0).to_string();
    print_rows(
        conn.output,
        &[
            "DRY RUN",
            "BLOBS REMOVED",
            "ORPHAN FILES REMOVED",
            "BYTES FREED",
            "FILES LEFT",
        ],
        &[vec![
            v["dryRun"].as_bool().unwrap_or(false).to_string(),
            n("blobsRemoved"),
            n("orphanFilesRemoved"),
            n("bytesFreed"),
            n("filesLeft"),
        ]],
    );
    if n("filesLeft") != "0" {
        eprintln!(
            "warning: {} blob files could not be deleted from the blob store now (see the server log); the next collection deletes them",
            n("filesLeft")
        );
    }
    Ok(())
}

/// `outpost readiness <repository>:<tag>` (or `@<digest>`).
#[derive(clap::Args, Debug)]
pub struct ReadinessArgs {
    /// The image, e.g. `app:1.4` or `team/app@sha256:…`
    image: String,
    /// Keep asking until it is ready, for at most this many seconds
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

/// Splits `repo:tag` or `repo@digest` (a `:` before the last `/` is a registry port, and
/// not allowed in a repository name here anyway).
fn split_image(image: &str) -> anyhow::Result<(String, String)> {
    if let Some((repo, digest)) = image.split_once('@') {
        return Ok((repo.to_string(), digest.to_string()));
    }
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => Ok((
            image[..slash + i].to_string(),
            image[slash + i + 1..].to_string(),
        )),
        None => bail!(
            "{image:?} names no tag or digest: write <repository>:<tag> or <repository>@<digest>"
        ),
    }
}

pub async fn readiness(conn: &Connection, args: ReadinessArgs) -> anyhow::Result<()> {
    let client = Client::new(conn)?;
    let (repo, reference) = split_image(&args.image)?;
    let path = format!(
        "/readiness?repository={}&reference={}",
        query_escape(&repo),
        query_escape(&reference)
    );
    let deadline = args
        .wait
        .map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
    let v = loop {
        let answer = client.call(Method::GET, &path, None).await;
        let waiting = deadline.is_some_and(|d| std::time::Instant::now() < d);
        let v = match answer {
            Ok(v) => v.unwrap_or_default(),
            // While waiting, an image that has not arrived at all is just not ready yet.
            Err(e)
                if waiting
                    && e.downcast_ref::<HttpStatus>()
                        .is_some_and(|h| h.status == reqwest::StatusCode::NOT_FOUND) =>
            {
                Value::Null
            }
            // An image that is not here at all is not ready (exit 1, not 2).
            Err(e)
                if e.downcast_ref::<HttpStatus>()
                    .is_some_and(|h| h.status == reqwest::StatusCode::NOT_FOUND) =>
            {
                return Err(NotReady(format!("{e:#}")).into());
            }
            Err(e) => return Err(e),
        };
        if waiting && !v["ready"].as_bool().unwrap_or(false) {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            continue;
        }
        break v;
    };
    let ready = v["ready"].as_bool().unwrap_or(false);
    if !conn.print_generic(&v)? {
        let n = |k: &str| v[k].as_u64().unwrap_or(0).to_string();
        let platforms: Vec<&str> = v["platforms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        print_rows(
            conn.output,
            &[
                "IMAGE",
                "DIGEST",
                "PLATFORMS",
                "MANIFESTS",
                "BLOBS",
                "BYTES",
                "READY",
            ],
            &[vec![
                args.image.clone(),
                v["digest"].as_str().unwrap_or("").to_string(),
                if platforms.is_empty() {
                    "-".into()
                } else {
                    platforms.join(",")
                },
                n("manifests"),
                n("blobs"),
                n("bytes"),
                if ready { "yes" } else { "no" }.into(),
            ]],
        );
        let missing: Vec<Vec<String>> = v["missing"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                vec![
                    m["kind"].as_str().unwrap_or("").to_string(),
                    m["digest"].as_str().unwrap_or("").to_string(),
                    m["platform"].as_str().unwrap_or("-").to_string(),
                ]
            })
            .collect();
        if !missing.is_empty() && conn.output == Output::Table {
            println!();
            print_rows(conn.output, &["MISSING", "DIGEST", "PLATFORM"], &missing);
        }
    }
    if !ready {
        let count = v["missing"].as_array().map_or(0, |m| m.len());
        return Err(NotReady(format!(
            "{} is not ready here: {count} manifest(s) or blob(s) missing; at a connected registry they arrive with the next sync (see `outpost connected-registry show` at the parent, or wait with --wait SECONDS); at the root, push the image again",
            args.image
        ))
        .into());
    }
    Ok(())
}

/// `outpost readiness` found something missing: exit status 1, kept apart from failing to
/// ask (2), so that `until outpost readiness app:1.4; do …` does not loop for ever on a
/// wrong password.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(String);

#[cfg(test)]
mod readiness_tests {
    use super::split_image;

    #[test]
    fn images_split_into_repository_and_reference() {
        let ok = |s: &str| split_image(s).unwrap();
        assert_eq!(ok("app:1.4"), ("app".into(), "1.4".into()));
        assert_eq!(ok("team/app:latest"), ("team/app".into(), "latest".into()));
        assert_eq!(
            ok("team/app@sha256:abc"),
            ("team/app".into(), "sha256:abc".into())
        );
        assert!(split_image("team/app").is_err());
    }
}
