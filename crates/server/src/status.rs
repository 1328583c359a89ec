//! The status page (`GET /status`, SPEC §5): one plain HTML page a person opens in a browser
//! on a site's network to see how this node is doing. It shows:
//! - what the node is and what it holds;
//! - its own sync with its parent, when it is a connected registry;
//! - garbage collection;
//! - the health of every connected registry below it.
//!
//! It is served under the same switch as the metrics (`metrics_enabled`) and shows the same
//! kind of facts: no repository or token names.

use crate::App;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::fmt::Write;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn when(unix: Option<i64>) -> String {
    match unix.and_then(|t| jiff::Timestamp::from_second(t).ok()) {
        Some(t) => {
            let ago = jiff::Timestamp::now().as_second() - t.as_second();
            format!(
                "{} ({} ago)",
                t.strftime("%Y-%m-%d %H:%M:%S UTC"),
                human_secs(ago)
            )
        }
        None => "never".into(),
    }
}

fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

pub(crate) async fn page(State(app): State<App>) -> Response {
    if !app.metrics_enabled {
        return (
            StatusCode::NOT_FOUND,
            "the status page is disabled on this registry (metrics_enabled = false)\n",
        )
            .into_response();
    }
    let me = app.registry.metrics().snapshot();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Outpost status</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head><body>\
         <h1>Outpost {}</h1><p>Role: <b>{}</b>{}</p>",
        esc(outpost_registry::version()),
        match &app.upstream {
            Some(upstream) => format!("mirror of {}", esc(upstream)),
            None if me.connected_registry => "connected registry".into(),
            None => "registry".into(),
        },
        if app.read_only {
            " (ReadOnly: clients pull only)"
        } else {
            ""
        }
    );
    h.push_str("<h2>Stored</h2><table>");
    match app.registry.meta().summary().await {
        Ok(s) => {
            for (k, v) in [
                ("Repositories", s.repositories.to_string()),
                ("Tags", s.tags.to_string()),
                ("Manifests", s.manifests.to_string()),
                ("Blobs", format!("{} ({})", s.blobs, bytes(s.blob_bytes))),
            ] {
                let _ = write!(h, "<tr><th>{k}</th><td>{v}</td></tr>");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "status page: could not read the store's summary");
            h.push_str("<tr><td>unavailable (see the server log)</td></tr>");
        }
    }
    h.push_str("</table>");
    // This node's own problems, as it reports them to its parent: codes only (their text
    // names repositories; `outpost connected-registry show` at the parent has it).
    let problems = {
        let mut codes = app.registry.metrics().sync_problems();
        codes.sort();
        codes.dedup();
        match codes.is_empty() {
            true => "none".to_string(),
            false => esc(&codes.join(", ")),
        }
    };
    if app.upstream.is_some() {
        // A mirror has no feed and no outbox: what it can say is whether its polls work.
        let _ = write!(
            h,
            "<h2>Mirroring the upstream</h2><table>\
             <tr><th>Last exchange with the upstream</th><td>{}</td></tr>\
             <tr><th>Last successful pass</th><td>{}</td></tr>\
             <tr><th>Problems</th><td>{problems}</td></tr>\
             <tr><th>Failed passes since start</th><td>{}</td></tr></table>",
            if me.parent_connected {
                "succeeded"
            } else {
                "failed"
            },
            when(me.last_sync_success_unix),
            me.sync_failures
        );
    } else if me.connected_registry {
        let _ = write!(
            h,
            "<h2>Sync with the parent</h2><table>\
             <tr><th>Last exchange with the parent</th><td>{}</td></tr>\
             <tr><th>Last successful sync</th><td>{}</td></tr>\
             <tr><th>Problems</th><td>{problems}</td></tr>\
             <tr><th>Parent messages still to apply</th><td>{}</td></tr>\
             <tr><th>Local changes still to send up</th><td>{}</td></tr>\
             <tr><th>Failed iterations since start</th><td>{}</td></tr></table>",
            if me.parent_connected {
                "succeeded"
            } else {
                "failed"
            },
            when(me.last_sync_success_unix),
            me.cursor_lag,
            me.outbox_depth,
            me.sync_failures
        );
    }
    let _ = write!(
        h,
        "<h2>Garbage collection</h2><table>\
         <tr><th>Last run</th><td>{}</td></tr>\
         <tr><th>Removed since start</th><td>{} blobs, {}</td></tr></table>",
        when(me.gc_last_run_unix),
        me.gc_blobs_removed,
        bytes(me.gc_bytes_freed)
    );
    match app.control.list_connected_registries(None, false).await {
        Ok(fleet) if !fleet.is_empty() => {
            h.push_str(
                "<h2>Connected registries below this one</h2><table><tr><th>Name</th>\
                 <th>Parent</th><th>Mode</th><th>State</th><th>Last heard from</th>\
                 <th>Messages to apply</th><th>Changes to send up</th><th>Problems</th></tr>",
            );
            for r in fleet {
                let unix = |t: &Option<String>| {
                    t.as_deref()
                        .and_then(|t| outpost_control::parse_rfc3339(t).ok())
                        .map(|ms| ms / 1000)
                };
                // Codes and counts only: a detail's text names repositories, tags and tokens,
                // which this page (open without credentials) must not show. The text is in
                // `outpost connected-registry show`.
                let mut problems: Vec<(String, usize)> = Vec::new();
                for d in &r.status_details {
                    let label = match d.kind.as_str() {
                        // Handled already (a resolved tag conflict): shown, labelled as such.
                        outpost_control::connected::NOTICE => format!("notice: {}", d.code),
                        _ => d.code.clone(),
                    };
                    match problems.iter_mut().find(|(l, _)| *l == label) {
                        Some((_, n)) => *n += 1,
                        None => problems.push((label, 1)),
                    }
                }
                let problems: Vec<String> = problems
                    .into_iter()
                    .map(|(l, n)| if n > 1 { format!("{l} (x{n})") } else { l })
                    .collect();
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&r.name),
                    esc(r.parent.as_deref().unwrap_or("(this registry)")),
                    esc(&r.mode),
                    esc(&r.connection_state),
                    when(unix(&r.last_activity_time)),
                    r.cursor_lag.map_or("-".into(), |v| v.to_string()),
                    r.outbox_depth.map_or("-".into(), |v| v.to_string()),
                    esc(&problems.join("; "))
                );
            }
            h.push_str("</table>");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "status page: could not read the connected registries")
        }
    }
    h.push_str("</body></html>\n");
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        h,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_secs(90), "90 s");
        assert_eq!(human_secs(3 * 86_400), "3 days");
        assert_eq!(esc("<b>&\""), "&lt;b&gt;&amp;&quot;");
    }
}
