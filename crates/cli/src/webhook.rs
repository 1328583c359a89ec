//! Delivers the notifications the root keeps (`outpost_control::notify`) to the operator's
//! webhook (`notification_url`): in order, in batches of up to 100, as
//! `POST {"notifications":[…]}` with the same objects the list API returns, retried with
//! backoff until the receiver answers 2xx. Delivery is at least once (a receiver may see a
//! batch again after a crash; each notification has a unique `id`). Where delivery stands is
//! kept in the database (`log_state`) per URL, so a restart goes on from there; a new URL
//! starts with the notifications that come after it was configured. A receiver that keeps
//! refusing holds back every later notification (logged as an error once the backoff is at
//! its longest); notifications older than the 30 days the root keeps them are gone,
//! delivered or not.

use outpost_control::Control;
use outpost_registry::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;

/// How often an idle delivery loop looks for new notifications.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The longest wait between two attempts at a batch the receiver refused.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub async fn deliver(
    control: Arc<Control>,
    metrics: Metrics,
    url: String,
    authorization: Option<String>,
) {
    // A redirect would turn the POST into a bodyless GET whose 200 would count as delivered.
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; notifications are not delivered");
            return;
        }
    };
    // What logs show of the URL: no query (it may carry a token).
    let shown = reqwest::Url::parse(&url)
        .map(|mut u| {
            u.set_query(None);
            u.to_string()
        })
        .unwrap_or_default();
    let mut cursor = loop {
        match control.webhook_cursor(&url).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read where webhook delivery stands; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        // Replicas sharing a database take turns, a batch each, so every notification goes
        // out once and in order.
        let turn = match control.delivery_turn().await {
            Ok(Some(turn)) => turn,
            Ok(None) => {
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot take a turn at webhook delivery; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if control.shares_database() {
            match control.webhook_cursor(&url).await {
                Ok(c) => cursor = c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read where webhook delivery stands; retrying");
                    drop(turn);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            }
        }
        let batch = match control.all_notifications(cursor, 100).await {
            Ok(b) if b.is_empty() => {
                drop(turn);
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read notifications to deliver; retrying");
                drop(turn);
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        let last = batch.last().map(|n| n.seq).unwrap_or_default();
        let mut req = client
            .post(&url)
            .json(&serde_json::json!({ "notifications": batch }));
        if let Some(a) = &authorization {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let failure = match req.send().await {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the webhook answered {}", r.status())),
            // Without the URL (its query may hold a token), with the causes.
            Err(e) => Some(format!(
                "the webhook cannot be reached: {}",
                outpost_oci::error::error_chain(&e.without_url())
            )),
        };
        match failure {
            None => {
                metrics.notifications_delivered(batch.len() as u64);
                backoff = Duration::from_secs(1);
                cursor = last;
                if let Err(e) = control.set_webhook_cursor(&url, last).await {
                    // Delivered again after the next restart: at least once.
                    tracing::warn!(error = %e, "cannot record the delivered notifications");
                }
            }
            Some(why) => {
                metrics.notification_delivery_failed();
                if backoff >= MAX_BACKOFF {
                    // Failing for a while: every later notification waits behind this batch.
                    tracing::error!(url = %shown, count = batch.len(), retry_in = ?backoff, "{why}; notifications wait until the webhook takes them");
                } else {
                    tracing::warn!(url = %shown, count = batch.len(), retry_in = ?backoff, "{why}; retrying");
                }
                // Another replica may try meanwhile (the batch stays first in line).
                drop(turn);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
