//! Rows of the connected-registry table. `outpost-control` owns the rules and the meaning of
//! every column; this module only stores and loads rows.

use crate::{Meta, MetaError, Result, now_ms};
use sqlx::{Any, Executor, Row};

/// A stored connected-registry resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectedRegistryRow {
    pub name: String,
    pub mode: String,
    pub parent: Option<String>,
    pub sync_token: String,
    pub client_tokens: Vec<String>,
    pub schedule: String,
    pub sync_window: Option<String>,
    pub message_ttl: String,
    pub log_level: String,
    pub notifications: Vec<String>,
    pub gc_enabled: bool,
    pub gc_schedule: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub activation: String,
    pub instance_id: Option<String>,
    pub last_activity_ms: Option<i64>,
    pub last_sync_ms: Option<i64>,
    pub sync_result: Option<String>,
    pub reported_state: Option<String>,
    /// JSON array of status details reported by the instance.
    pub status_details: String,
    pub version: Option<String>,
    pub login_server: Option<String>,
    pub resync_requested: bool,
    /// Messages the instance had yet to apply at its last report.
    pub cursor_lag: Option<i64>,
    /// Local changes the instance had yet to send up at its last report.
    pub outbox_depth: Option<i64>,
    /// On an intermediate node: the active instance was granted here while this node's parent
    /// was unreachable, and the root has not heard of it yet.
    pub activated_offline: bool,
}

const COLUMNS: &str = "name, mode, parent, sync_token, client_tokens, schedule, sync_window, message_ttl, \
     log_level, notifications, gc_enabled, gc_schedule, created_at, updated_at, activation, instance_id, \
     last_activity, last_sync, sync_result, reported_state, status_details, version, login_server, resync_requested, \
     cursor_lag, outbox_depth, activated_offline";

fn json_list(s: String) -> Result<Vec<String>> {
    serde_json::from_str(&s)
        .map_err(|e| MetaError::Corrupt(format!("connected registry list: {e}")))
}

fn row(r: sqlx::any::AnyRow) -> Result<ConnectedRegistryRow> {
    Ok(ConnectedRegistryRow {
        name: r.try_get(0)?,
        mode: r.try_get(1)?,
        parent: r.try_get(2)?,
        sync_token: r.try_get(3)?,
        client_tokens: json_list(r.try_get(4)?)?,
        schedule: r.try_get(5)?,
        sync_window: r.try_get(6)?,
        message_ttl: r.try_get(7)?,
        log_level: r.try_get(8)?,
        notifications: json_list(r.try_get(9)?)?,
        gc_enabled: r.try_get::<i64, _>(10)? != 0,
        gc_schedule: r.try_get(11)?,
        created_ms: r.try_get(12)?,
        updated_ms: r.try_get(13)?,
        activation: r.try_get(14)?,
        instance_id: r.try_get(15)?,
        last_activity_ms: r.try_get(16)?,
        last_sync_ms: r.try_get(17)?,
        sync_result: r.try_get(18)?,
        reported_state: r.try_get(19)?,
        status_details: r.try_get(20)?,
        version: r.try_get(21)?,
        login_server: r.try_get(22)?,
        resync_requested: r.try_get::<i64, _>(23)? != 0,
        cursor_lag: r.try_get(24)?,
        outbox_depth: r.try_get(25)?,
        activated_offline: r.try_get::<i64, _>(26)? != 0,
    })
}

impl Meta {
    pub async fn connected_registry(&self, name: &str) -> Result<Option<ConnectedRegistryRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM connected_registries WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.read)
        .await?
        .map(row)
        .transpose()
    }

    pub async fn connected_registries(&self) -> Result<Vec<ConnectedRegistryRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM connected_registries ORDER BY name"
        ))
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .map(row)
        .collect()
    }

    /// Inserts or replaces a row (callers read, change and write back under their own lock).
    pub async fn put_connected_registry(&self, c: &ConnectedRegistryRow) -> Result<()> {
        put_connected_registry(&self.write, c).await
    }
}

pub(crate) async fn put_connected_registry<'e>(
    ex: impl Executor<'e, Database = Any>,
    c: &ConnectedRegistryRow,
) -> Result<()> {
    let list =
        |v: &Vec<String>| serde_json::to_string(v).map_err(|e| MetaError::Corrupt(e.to_string()));
    sqlx::query(&crate::upsert("connected_registries", COLUMNS))
        .bind(&c.name)
        .bind(&c.mode)
        .bind(&c.parent)
        .bind(&c.sync_token)
        .bind(list(&c.client_tokens)?)
        .bind(&c.schedule)
        .bind(&c.sync_window)
        .bind(&c.message_ttl)
        .bind(&c.log_level)
        .bind(list(&c.notifications)?)
        .bind(i64::from(c.gc_enabled))
        .bind(&c.gc_schedule)
        .bind(c.created_ms)
        .bind(now_ms())
        .bind(&c.activation)
        .bind(&c.instance_id)
        .bind(c.last_activity_ms)
        .bind(c.last_sync_ms)
        .bind(&c.sync_result)
        .bind(&c.reported_state)
        .bind(&c.status_details)
        .bind(&c.version)
        .bind(&c.login_server)
        .bind(i64::from(c.resync_requested))
        .bind(c.cursor_lag)
        .bind(c.outbox_depth)
        .bind(i64::from(c.activated_offline))
        .execute(ex)
        .await?;
    Ok(())
}

pub(crate) async fn delete_connected_registry<'e>(
    ex: impl Executor<'e, Database = Any>,
    name: &str,
) -> Result<bool> {
    let res = sqlx::query("DELETE FROM connected_registries WHERE name = $1")
        .bind(name)
        .execute(ex)
        .await?;
    Ok(res.rows_affected() > 0)
}
