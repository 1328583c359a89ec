//! Notifications received from connected registries (their clients' and their sync's pushes
//! and deletes that matched the registry's notification patterns), kept at the root for
//! readers of `GET /api/v1/connected-registries/<name>/notifications`. `outpost-control` owns
//! their meaning; this module stores, lists and prunes rows.

use crate::{Meta, Result, now_ms};
use sqlx::Row;

/// One stored notification.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NotificationRow {
    /// Position in the root's list (assigned on insert; ignored when inserting).
    pub seq: i64,
    /// When the root received it (Unix milliseconds; assigned on insert).
    pub received_ms: i64,
    /// The connected registry it happened at.
    pub registry: String,
    /// The sender's id for it: a resent notification with the same id is stored once.
    pub id: String,
    /// When it happened at the connected registry (RFC 3339, as sent).
    pub time: String,
    pub action: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub media_type: Option<String>,
}

impl Meta {
    /// Stores `rows` in one transaction, skipping those whose (registry, id) is already stored.
    /// Returns, for each row, whether it was new.
    pub async fn insert_notifications(&self, rows: &[NotificationRow]) -> Result<Vec<bool>> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let mut new = Vec::with_capacity(rows.len());
        for r in rows {
            let n = sqlx::query(
                "INSERT INTO notifications \
                 (received_at, registry, id, time, action, repository, tag, digest, media_type) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            )
            .bind(now)
            .bind(&r.registry)
            .bind(&r.id)
            .bind(&r.time)
            .bind(&r.action)
            .bind(&r.repository)
            .bind(&r.tag)
            .bind(&r.digest)
            .bind(&r.media_type)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            new.push(n > 0);
        }
        tx.commit().await?;
        Ok(new)
    }

    /// Notifications of `registry` after position `after`, oldest first, at most `limit`.
    pub async fn notifications(
        &self,
        registry: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<NotificationRow>> {
        let rows = sqlx::query(
            "SELECT seq, received_at, registry, id, time, action, repository, tag, digest, media_type \
             FROM notifications WHERE registry = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(registry)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Notifications of every registry after position `after`, oldest first, at most `limit`.
    pub async fn all_notifications(&self, after: i64, limit: u32) -> Result<Vec<NotificationRow>> {
        let rows = sqlx::query(
            "SELECT seq, received_at, registry, id, time, action, repository, tag, digest, media_type \
             FROM notifications WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// The newest notification's position (0 when none was ever kept).
    pub async fn latest_notification(&self) -> Result<i64> {
        let sql = match self.backend() {
            crate::Backend::Sqlite => {
                "SELECT seq FROM sqlite_sequence WHERE name = 'notifications'"
            }
            // Inserts commit one at a time under the write lock, in sequence order; the
            // sequence itself also moves for duplicates skipped and inserts not yet committed.
            crate::Backend::Postgres => "SELECT max(seq) FROM notifications",
        };
        Ok(sqlx::query_scalar::<_, Option<i64>>(sql)
            .fetch_optional(&self.read)
            .await?
            .flatten()
            .unwrap_or(0))
    }

    /// Deletes the notifications of `registry` (it was deleted).
    pub async fn delete_notifications(&self, registry: &str) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM notifications WHERE registry = $1")
            .bind(registry)
            .execute(&self.write)
            .await?
            .rows_affected())
    }

    /// Deletes notifications received before `before_ms`; returns how many.
    pub async fn prune_notifications(&self, before_ms: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM notifications WHERE received_at < $1")
                .bind(before_ms)
                .execute(&self.write)
                .await?
                .rows_affected(),
        )
    }
}

fn from_row(r: sqlx::any::AnyRow) -> Result<NotificationRow> {
    Ok(NotificationRow {
        seq: r.try_get(0)?,
        received_ms: r.try_get(1)?,
        registry: r.try_get(2)?,
        id: r.try_get(3)?,
        time: r.try_get(4)?,
        action: r.try_get(5)?,
        repository: r.try_get(6)?,
        tag: r.try_get(7)?,
        digest: r.try_get(8)?,
        media_type: r.try_get(9)?,
    })
}
