//! `outpost connected-registry …`: the `az acr connected-registry` commands, flags, defaults
//! and prompts over the management API; `list` draws the hierarchy as a tree.

use crate::client::{Client, Connection, Output, confirm, print_rows};
use anyhow::bail;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum ConnectedRegistryCmd {
    /// Create a connected registry (and its sync token and scope map).
    #[command(after_help = "Examples:
  A read-only site that syncs two repositories continuously:
    outpost connected-registry create -n ship1 --repository app base/alpine
  A read-write site that syncs nightly for four hours, for client token 'crew-token':
    outpost connected-registry create -n ship2 -m ReadWrite --repository app \\
      --client-tokens crew-token -s '0 22 * * *' -w PT4H
  A line under site 'ship1' (what it syncs must be synced by ship1):
    outpost connected-registry create -n line1 -p ship1 --repository app")]
    Create {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// ReadOnly (clients pull only) or ReadWrite (local pushes go up to the parent); a
        /// ReadWrite registry needs a ReadWrite parent
        #[arg(long, short = 'm', default_value = "ReadOnly", value_parser = ["ReadOnly", "ReadWrite"], ignore_case = true)]
        mode: String,
        /// Parent connected registry (default: this registry)
        #[arg(long, short = 'p')]
        parent: Option<String>,
        /// Repositories to sync
        #[arg(long, num_args = 1.., conflicts_with = "sync_token")]
        repository: Vec<String>,
        /// Adopt an existing token as the sync token
        #[arg(long)]
        sync_token: Option<String>,
        /// Client tokens that may use the connected registry (they authenticate there while offline)
        #[arg(long, num_args = 1..)]
        client_tokens: Vec<String>,
        /// Cron schedule, UTC; the default syncs continuously
        #[arg(long, short = 's', default_value = "* * * * *")]
        sync_schedule: String,
        /// ISO 8601 duration each scheduled sync may last (required with a schedule)
        #[arg(long, short = 'w')]
        sync_window: Option<String>,
        /// ISO 8601 duration the parent keeps messages for the connected registry (at least P1D by default); offline longer, it reconciles fully
        #[arg(long, default_value = "P2D")]
        sync_message_ttl: String,
        /// Log level of the connected registry: Debug, Information, Warning, Error or None
        #[arg(long, default_value = "Information")]
        log_level: String,
        /// Notification patterns, <repository>[:<tag>][@<digest>]:<push|delete|*> with * wildcards (e.g. 'app:*:push'): what it reports to the root
        #[arg(long, num_args = 1..)]
        notifications: Vec<String>,
        /// Whether garbage collection runs at the site (a bare flag means true)
        #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
        gc_enabled: bool,
        /// Cron schedule (UTC) of garbage collection at the site
        #[arg(long, default_value = "0 0 * * *")]
        gc_schedule: String,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Update a connected registry.
    #[command(after_help = "Examples:
  Sync only inside a two-hour window starting at 01:00 UTC:
    outpost connected-registry update -n ship1 -s '0 1 * * *' -w PT2H
  Sync continuously again, and let token 'crew-token' in:
    outpost connected-registry update -n ship1 -s '* * * * *' --add-client-tokens crew-token")]
    Update {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Client tokens to add
        #[arg(long, num_args = 1..)]
        add_client_tokens: Vec<String>,
        /// Client tokens to remove
        #[arg(long, num_args = 1..)]
        remove_client_tokens: Vec<String>,
        /// Cron schedule, UTC ("* * * * *": continuously)
        #[arg(long, short = 's')]
        sync_schedule: Option<String>,
        /// ISO 8601 duration each scheduled sync may last
        #[arg(long, short = 'w')]
        sync_window: Option<String>,
        /// ISO 8601 duration the parent keeps messages for the connected registry (at least P1D by default); offline longer, it reconciles fully
        #[arg(long)]
        sync_message_ttl: Option<String>,
        /// Log level of the connected registry: Debug, Information, Warning, Error or None
        #[arg(long)]
        log_level: Option<String>,
        /// Notification patterns to add, <repository>[:<tag>][@<digest>]:<push|delete|*>
        #[arg(long, num_args = 1..)]
        add_notifications: Vec<String>,
        /// Notification patterns to remove
        #[arg(long, num_args = 1..)]
        remove_notifications: Vec<String>,
        /// Whether garbage collection runs at the site (a bare flag means true)
        #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
        gc_enabled: Option<bool>,
        /// Cron schedule (UTC) of garbage collection at the site
        #[arg(long)]
        gc_schedule: Option<String>,
    },
    /// Show a connected registry.
    Show {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
    },
    /// List connected registries as a tree.
    List {
        /// Only the descendants of this connected registry
        #[arg(long, short = 'p')]
        parent: Option<String>,
        /// Only direct children (of --parent, or of this registry)
        #[arg(long)]
        no_children: bool,
    },
    /// Delete a connected registry.
    Delete {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Also delete the sync token and scope map, and its gateway actions from the ancestors
        #[arg(long)]
        cleanup: bool,
        /// Delete even while an instance is active
        #[arg(long)]
        force: bool,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Deactivate, so that a new instance can be deployed.
    Deactivate {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Print the connection string and settings an instance needs.
    #[command(
        after_help = "Example (a new sync password; the connection string carries it):
    outpost connected-registry get-settings -n ship1 --parent-protocol https \\
      --generate-password 1 -y
  then, at the site:
    OUTPOST_CONNECTION_STRING='<connection string>' outpost serve --data-dir /var/lib/outpost"
    )]
    GetSettings {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Protocol the instance uses to reach its parent: http or https
        #[arg(long, value_parser = ["http", "https"])]
        parent_protocol: String,
        /// Generate (rotate) sync token password 1 or 2
        #[arg(long, value_parser = ["1", "2"])]
        generate_password: Option<String>,
        /// host[:port] the instance uses to reach its parent (default: for a child of the root, as given in --registry; below that, the address its parent connected registry reported)
        #[arg(long)]
        parent_endpoint: Option<String>,
        /// Do not prompt for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Write an offline bundle: everything in the registry's scope here, and its
    /// configuration, as an OCI image layout directory (`outpost import` reads it at the site).
    #[command(after_help = "Example:
    outpost connected-registry export -n ship1 --dir /media/usb/ship1
  then, at the site, with its server stopped:
    outpost import --data-dir /var/lib/outpost --dir /media/usb/ship1")]
    Export {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Directory to write (created; an earlier export there is reused)
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// List the client tokens of a connected registry.
    ListClientTokens {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
    },
    /// List the notifications a connected registry sent (kept at the root for 30 days),
    /// oldest first.
    ListNotifications {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Only those after this position (the SEQ column), to read on from the last one seen
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// At most this many (1–1000)
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        top: u32,
    },
    /// Show or change which repositories a connected registry syncs.
    #[command(subcommand)]
    Permissions(PermissionsCmd),
    /// Ask the instance for a full reconciliation at its next sync.
    Resync {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PermissionsCmd {
    /// Show the sync scope map.
    Show {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
    },
    /// Add repositories (also to every ancestor that lacks them) or remove them (also from
    /// every descendant, unless its parent still syncs them through a wildcard).
    Update {
        /// Name of the connected registry
        #[arg(long, short = 'n')]
        name: String,
        /// Repositories (or prefix/* patterns) to add
        #[arg(long, num_args = 1..)]
        add: Vec<String>,
        /// Repositories (or patterns) to remove
        #[arg(long, num_args = 1..)]
        remove: Vec<String>,
    },
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_one(conn: &Connection, v: &Value) -> anyhow::Result<()> {
    if conn.print_generic(v)? {
        return Ok(());
    }
    print_rows(
        conn.output,
        &[
            "NAME",
            "MODE",
            "CONNECTION STATE",
            "PARENT",
            "LOGIN SERVER",
            "LAST SYNC (UTC)",
            "LAST HEARD (UTC)",
            "SYNC SCHEDULE",
            "SYNC WINDOW",
            "SYNC STATE",
        ],
        &[vec![
            s(&v["name"]),
            s(&v["mode"]),
            s(&v["connectionState"]),
            match v["parent"].as_str() {
                Some(p) => p.to_string(),
                None => "(this registry)".into(),
            },
            s(&v["loginServer"]),
            s(&v["lastSyncTime"]),
            s(&v["lastActivityTime"]),
            s(&v["syncSchedule"]),
            s(&v["syncWindow"]),
            s(&v["syncState"]),
        ]],
    );
    // The table has no room for what is wrong: each status detail follows it, in full.
    if conn.output == Output::Table
        && let Some(details) = v["statusDetails"].as_array().filter(|d| !d.is_empty())
    {
        println!();
        for d in details {
            let when = match d["timestamp"].as_str() {
                Some(t) => format!(" ({t})"),
                None => String::new(),
            };
            println!("{}{when}: {}", s(&d["code"]), s(&d["description"]));
        }
    }
    Ok(())
}

/// Names prefixed with tree branches, from a depth-first list.
fn tree_names(items: &[Value]) -> Vec<String> {
    let parent_of = |n: &str| {
        items
            .iter()
            .find(|v| v["name"] == n)
            .and_then(|v| v["parent"].as_str().map(String::from))
    };
    let listed = |n: &str| items.iter().any(|v| v["name"] == n);
    let depth = |n: &str| {
        let mut d = 0;
        let mut cur = parent_of(n);
        while let Some(p) = cur {
            if !listed(&p) || d > 64 {
                break;
            }
            d += 1;
            cur = parent_of(&p);
        }
        d
    };
    let depths: Vec<usize> = items.iter().map(|v| depth(&s(&v["name"]))).collect();
    // The last of its siblings: no later item at the same depth before a shallower one.
    let last = |i: usize| {
        !depths[i + 1..]
            .iter()
            .take_while(|wd| **wd >= depths[i])
            .any(|wd| *wd == depths[i])
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let name = s(&v["name"]);
            let d = depths[i];
            if d == 0 {
                return name;
            }
            // A line continues down past this row for every ancestor with siblings still to
            // come (the ancestor at depth k is the nearest earlier row at that depth).
            let mut out = String::new();
            for k in 1..d {
                let ancestor = (0..i).rev().find(|j| depths[*j] == k);
                out.push_str(if ancestor.is_some_and(last) {
                    "    "
                } else {
                    "│   "
                });
            }
            out.push_str(if last(i) { "└── " } else { "├── " });
            out.push_str(&name);
            out
        })
        .collect()
}

/// Status details by code, with a count where one repeats (`show -o json` has their text):
/// why a registry is Unhealthy, in a table row.
fn problems(details: &Value) -> String {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for d in details.as_array().map(Vec::as_slice).unwrap_or_default() {
        let code = s(&d["code"]);
        match seen.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => seen.push((code, 1)),
        }
    }
    seen.into_iter()
        .map(|(c, n)| if n > 1 { format!("{c} (x{n})") } else { c })
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_list(conn: &Connection, list: &Value) -> anyhow::Result<()> {
    if conn.print_generic(list)? {
        return Ok(());
    }
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    let output = conn.output;
    let names = if output == Output::Table {
        tree_names(items)
    } else {
        items.iter().map(|v| s(&v["name"])).collect()
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .zip(names)
        .map(|(v, n)| {
            let parent = match v["parent"].as_str() {
                None if output == Output::Table => "(this registry)".to_string(),
                _ => s(&v["parent"]),
            };
            vec![
                n,
                s(&v["mode"]),
                s(&v["connectionState"]),
                parent,
                s(&v["loginServer"]),
                s(&v["lastSyncTime"]),
                s(&v["lastActivityTime"]),
                s(&v["syncState"]),
                problems(&v["statusDetails"]),
            ]
        })
        .collect();
    print_rows(
        output,
        &[
            "NAME",
            "MODE",
            "CONNECTION STATE",
            "PARENT",
            "LOGIN SERVER",
            "LAST SYNC (UTC)",
            "LAST HEARD (UTC)",
            "SYNC STATE",
            "PROBLEMS",
        ],
        &rows,
    );
    Ok(())
}

fn print_scope_map(conn: &Connection, v: &Value) -> anyhow::Result<()> {
    if conn.print_generic(v)? {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["actions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| vec![s(&v["name"]), s(a)])
        .collect();
    print_rows(conn.output, &["SCOPE MAP", "ACTION"], &rows);
    Ok(())
}

pub async fn run(conn: &Connection, cmd: ConnectedRegistryCmd) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let path = |name: &str, rest: &str| format!("/connected-registries/{name}{rest}");
    match cmd {
        ConnectedRegistryCmd::Create {
            name,
            mode,
            parent,
            repository,
            sync_token,
            client_tokens,
            sync_schedule,
            sync_window,
            sync_message_ttl,
            log_level,
            notifications,
            gc_enabled,
            gc_schedule,
            yes: _,
        } => {
            if repository.is_empty() == sync_token.is_none() {
                bail!(
                    "argument error: either --sync-token or --repository must be provided, but not both."
                );
            }
            let body = json!({
                "name": name, "mode": mode, "parent": parent, "repositories": repository, "syncToken": sync_token,
                "clientTokens": client_tokens, "syncSchedule": sync_schedule, "syncWindow": sync_window,
                "syncMessageTtl": sync_message_ttl, "logLevel": log_level, "notifications": notifications,
                "gcEnabled": gc_enabled, "gcSchedule": gc_schedule,
            });
            let v = c
                .call(Method::POST, "/connected-registries", Some(body))
                .await?
                .unwrap_or_default();
            print_one(conn, &v)?;
        }
        ConnectedRegistryCmd::Update {
            name,
            add_client_tokens,
            remove_client_tokens,
            sync_schedule,
            sync_window,
            sync_message_ttl,
            log_level,
            add_notifications,
            remove_notifications,
            gc_enabled,
            gc_schedule,
        } => {
            let body = json!({
                "addClientTokens": add_client_tokens, "removeClientTokens": remove_client_tokens,
                "syncSchedule": sync_schedule, "syncWindow": sync_window, "syncMessageTtl": sync_message_ttl,
                "logLevel": log_level, "addNotifications": add_notifications, "removeNotifications": remove_notifications,
                "gcEnabled": gc_enabled, "gcSchedule": gc_schedule,
            });
            let v = c
                .call(Method::PATCH, &path(&name, ""), Some(body))
                .await?
                .unwrap_or_default();
            print_one(conn, &v)?;
        }
        ConnectedRegistryCmd::Show { name } => {
            let v = c
                .call(Method::GET, &path(&name, ""), None)
                .await?
                .unwrap_or_default();
            print_one(conn, &v)?;
        }
        ConnectedRegistryCmd::List {
            parent,
            no_children,
        } => {
            let mut q = Vec::new();
            if let Some(p) = &parent {
                q.push(format!("parent={p}"));
            }
            if no_children {
                q.push("noChildren=true".into());
            }
            let suffix = if q.is_empty() {
                String::new()
            } else {
                format!("?{}", q.join("&"))
            };
            let v = c
                .call(Method::GET, &format!("/connected-registries{suffix}"), None)
                .await?
                .unwrap_or(json!([]));
            print_list(conn, &v)?;
        }
        ConnectedRegistryCmd::Delete {
            name,
            cleanup,
            force,
            yes,
        } => {
            let without = if cleanup {
                ""
            } else {
                " without cleanup flag enabled"
            };
            confirm(
                &format!(
                    "Are you sure you want to delete the connected registry '{name}'{without}?"
                ),
                yes,
            )?;
            let v = c
                .call(
                    Method::DELETE,
                    &path(&name, &format!("?cleanup={cleanup}&force={force}")),
                    None,
                )
                .await?
                .unwrap_or_default();
            if !conn.print_generic(&v)? {
                match v["remainingSteps"].as_array().filter(|s| !s.is_empty()) {
                    Some(steps) => {
                        // A registry at the top has no ancestors holding gateway rights.
                        let gateway = steps.iter().any(|st| s(st).contains("--remove-gateway"));
                        eprintln!(
                            "Deleted connected registry '{name}'. Its sync token{} remain; remove them with:",
                            if gateway {
                                ", scope map and the ancestors' gateway permissions"
                            } else {
                                " and scope map"
                            }
                        );
                        for step in steps {
                            println!("  {}", s(step));
                        }
                    }
                    None => eprintln!(
                        "Deleted connected registry '{name}' with its sync token, scope map and the ancestors' gateway permissions."
                    ),
                }
            }
        }
        ConnectedRegistryCmd::Deactivate { name, yes } => {
            confirm(
                &format!("Are you sure you want to deactivate the connected registry '{name}'?"),
                yes,
            )?;
            let v = c
                .call(Method::POST, &path(&name, "/deactivate"), Some(json!({})))
                .await?
                .unwrap_or_default();
            print_one(conn, &v)?;
        }
        ConnectedRegistryCmd::GetSettings {
            name,
            parent_protocol,
            generate_password,
            parent_endpoint,
            yes,
        } => {
            if let Some(n) = &generate_password {
                confirm(
                    &format!(
                        "Are you sure you want to generate a new sync token password{n} for '{name}'? Instances configured with the old password will stop syncing."
                    ),
                    yes,
                )?;
            }
            let mut body = json!({
                "parentProtocol": parent_protocol,
                "generatePassword": generate_password.map(|g| g.parse::<u8>().unwrap_or(0)),
            });
            if let Some(e) = &parent_endpoint {
                body["parentEndpoint"] = json!(e);
            }
            let v = c
                .call(Method::POST, &path(&name, "/get-settings"), Some(body))
                .await?
                .unwrap_or_default();
            // An endpoint the operator chose is theirs to judge (a loopback one is right for
            // an instance on the same machine).
            if parent_endpoint.is_none()
                && let Some(why) = unreachable_endpoint(&s(&v["ACR_REGISTRY_CONNECTION_STRING"]))
            {
                eprintln!(
                    "warning: the connection string's ParentGatewayEndpoint {why}; pass --parent-endpoint <host[:port]> with the address the instance reaches its parent at"
                );
            }
            if conn.print_generic(&v)? {
                return Ok(());
            }
            if conn.output == Output::Tsv {
                // tsv: just the connection string, for `--output tsv` in scripts
                println!("{}", s(&v["ACR_REGISTRY_CONNECTION_STRING"]));
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, val)| vec![k.clone(), s(val)])
                    .collect();
                print_rows(Output::Table, &["SETTING", "VALUE"], &rows);
            }
        }
        ConnectedRegistryCmd::Export { name, dir } => {
            if conn.query.is_some() {
                bail!(
                    "--query selects from an answer; `connected-registry export` writes a bundle and has none"
                );
            }
            crate::bundle::export(conn, &name, &dir).await?
        }
        ConnectedRegistryCmd::ListNotifications { name, after, top } => {
            let v = c
                .call(
                    Method::GET,
                    &path(&name, &format!("/notifications?after={after}&n={top}")),
                    None,
                )
                .await?
                .unwrap_or(json!([]));
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    let artifact = match (n["tag"].as_str(), n["digest"].as_str()) {
                        (Some(t), _) => format!("{}:{t}", s(&n["repository"])),
                        (None, Some(d)) => format!("{}@{d}", s(&n["repository"])),
                        (None, None) => s(&n["repository"]),
                    };
                    vec![s(&n["seq"]), s(&n["time"]), s(&n["action"]), artifact]
                })
                .collect();
            if !conn.print_generic(&v)? {
                print_rows(conn.output, &["SEQ", "TIME", "ACTION", "ARTIFACT"], &rows);
            }
        }
        ConnectedRegistryCmd::ListClientTokens { name } => {
            let v = c
                .call(Method::GET, &path(&name, "/client-tokens"), None)
                .await?
                .unwrap_or(json!([]));
            let rows: Vec<Vec<String>> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| vec![s(&t["name"]), s(&t["scopeMap"]), s(&t["status"])])
                .collect();
            if !conn.print_generic(&v)? {
                print_rows(conn.output, &["NAME", "SCOPE MAP", "STATUS"], &rows);
            }
        }
        ConnectedRegistryCmd::Permissions(PermissionsCmd::Show { name }) => {
            let v = c
                .call(Method::GET, &path(&name, "/permissions"), None)
                .await?
                .unwrap_or_default();
            print_scope_map(conn, &v)?;
        }
        ConnectedRegistryCmd::Permissions(PermissionsCmd::Update { name, add, remove }) => {
            if add.is_empty() && remove.is_empty() {
                bail!("No repository permissions to update.");
            }
            let v = c
                .call(
                    Method::PATCH,
                    &path(&name, "/permissions"),
                    Some(json!({"add": add, "remove": remove})),
                )
                .await?
                .unwrap_or_default();
            print_scope_map(conn, &v)?;
        }
        ConnectedRegistryCmd::Resync { name } => {
            let v = c
                .call(Method::POST, &path(&name, "/resync"), Some(json!({})))
                .await?
                .unwrap_or_default();
            print_one(conn, &v)?;
        }
    }
    Ok(())
}

/// Why a connection string's parent endpoint cannot work from another machine, if it cannot:
/// a placeholder, a loopback address or a wildcard listen address.
fn unreachable_endpoint(connection_string: &str) -> Option<String> {
    let endpoint = connection_string
        .split(';')
        .find_map(|kv| kv.strip_prefix("ParentGatewayEndpoint="))?;
    if endpoint.starts_with('<') {
        return Some("is not known yet (the parent has not reported its address)".into());
    }
    let host = match endpoint.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => endpoint,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        return Some(format!("is {endpoint}, a loopback address"));
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => Some(format!("is {endpoint}, a loopback address")),
        Ok(ip) if ip.is_unspecified() => Some(format!("is {endpoint}, a wildcard listen address")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_continues_only_where_siblings_follow() {
        let items: Vec<Value> = [
            ("site-one", None),
            ("line-one", Some("site-one")),
            ("cell-one", Some("line-one")),
            ("site-two", None),
            ("line-two", Some("site-two")),
            ("cell-two", Some("line-two")),
            ("line-three", Some("site-two")),
        ]
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n, "parent": p}))
        .collect();
        assert_eq!(
            tree_names(&items),
            [
                "site-one",
                "└── line-one",
                "    └── cell-one",
                "site-two",
                "├── line-two",
                "│   └── cell-two",
                "└── line-three",
            ]
        );
    }

    #[test]
    fn endpoints_other_machines_cannot_reach_are_named() {
        let cs = |e: &str| {
            format!(
                "ConnectedRegistryName=a;SyncTokenName=b;SyncTokenPassword=c;ParentGatewayEndpoint={e};ParentEndpointProtocol=https"
            )
        };
        for e in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "0.0.0.0:5000",
            "<parent gateway endpoint>",
        ] {
            assert!(unreachable_endpoint(&cs(e)).is_some(), "{e}");
        }
        for e in ["registry.example:5000", "10.1.2.3:5000", "registry.example"] {
            assert_eq!(unreachable_endpoint(&cs(e)), None, "{e}");
        }
    }
}
