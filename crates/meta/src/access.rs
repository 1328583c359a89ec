//! Rows of the access-control tables (scope maps and tokens). `outpost-control` owns their
//! meaning; this module only stores and loads them.

use crate::{ConnectedRegistryRow, Meta, MetaError, Result, now_ms};
use sqlx::{Any, Executor, Row};

/// A stored scope map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeMapRow {
    pub name: String,
    pub description: String,
    /// Rule strings such as `repositories/app/content/read`.
    pub actions: Vec<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// One of a token's two password slots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PasswordRow {
    /// Argon2id PHC string; `None` when the slot is empty.
    pub hash: Option<String>,
    pub created_ms: Option<i64>,
    pub expiry_ms: Option<i64>,
}

/// A stored token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub name: String,
    pub scope_map: Option<String>,
    pub status: String,
    pub is_admin: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub passwords: [PasswordRow; 2],
}

fn scope_map_row(r: sqlx::any::AnyRow) -> Result<ScopeMapRow> {
    let actions: String = r.try_get(2)?;
    Ok(ScopeMapRow {
        name: r.try_get(0)?,
        description: r.try_get(1)?,
        actions: serde_json::from_str(&actions)
            .map_err(|e| MetaError::Corrupt(format!("scope map actions: {e}")))?,
        created_ms: r.try_get(3)?,
        updated_ms: r.try_get(4)?,
    })
}

fn token_row(r: sqlx::any::AnyRow) -> Result<TokenRow> {
    let slot = |i: usize| -> Result<PasswordRow> {
        Ok(PasswordRow {
            hash: r.try_get(6 + i * 3)?,
            created_ms: r.try_get(7 + i * 3)?,
            expiry_ms: r.try_get(8 + i * 3)?,
        })
    };
    Ok(TokenRow {
        name: r.try_get(0)?,
        scope_map: r.try_get(1)?,
        status: r.try_get(2)?,
        is_admin: r.try_get::<i64, _>(3)? != 0,
        created_ms: r.try_get(4)?,
        updated_ms: r.try_get(5)?,
        passwords: [slot(0)?, slot(1)?],
    })
}

const TOKEN_COLUMNS: &str = "name, scope_map, status, is_admin, created_at, updated_at, \
     password1_hash, password1_created, password1_expiry, password2_hash, password2_created, password2_expiry";

impl Meta {
    pub async fn scope_map(&self, name: &str) -> Result<Option<ScopeMapRow>> {
        sqlx::query("SELECT name, description, actions, created_at, updated_at FROM scope_maps WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.read)
            .await?
            .map(scope_map_row)
            .transpose()
    }

    pub async fn scope_maps(&self) -> Result<Vec<ScopeMapRow>> {
        sqlx::query("SELECT name, description, actions, created_at, updated_at FROM scope_maps ORDER BY name")
            .fetch_all(&self.read)
            .await?
            .into_iter()
            .map(scope_map_row)
            .collect()
    }

    pub async fn count_scope_maps(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM scope_maps")
            .fetch_one(&self.read)
            .await?;
        Ok(n as u64)
    }

    /// Inserts a scope map; returns false if one with that name exists.
    pub async fn insert_scope_map(
        &self,
        name: &str,
        description: &str,
        actions: &[String],
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = insert_scope_map(&mut *tx, name, description, actions).await?;
        self.note_access_change(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Replaces a scope map's description and actions; returns false if it does not exist.
    pub async fn update_scope_map(
        &self,
        name: &str,
        description: &str,
        actions: &[String],
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = update_scope_map(&mut *tx, name, description, actions).await?;
        self.note_access_change(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    pub async fn delete_scope_map(&self, name: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = delete_scope_map(&mut *tx, name).await?;
        self.note_access_change(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// The configuration JSON of a client token relayed to a descendant.
    pub async fn relayed_token(&self, name: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT config FROM relayed_tokens WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    pub async fn token(&self, name: &str) -> Result<Option<TokenRow>> {
        // No stored name holds a NUL, and PostgreSQL refuses one even in a lookup: a login
        // with one is an unknown token, as on SQLite.
        if name.contains('\0') {
            return Ok(None);
        }
        sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM tokens WHERE name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.read)
        .await?
        .map(token_row)
        .transpose()
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name"))
            .fetch_all(&self.read)
            .await?
            .into_iter()
            .map(token_row)
            .collect()
    }

    pub async fn count_tokens(&self) -> Result<u64> {
        // The administrator token is ACR's admin user, which no token limit counts.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tokens WHERE is_admin = 0")
            .fetch_one(&self.read)
            .await?;
        Ok(n as u64)
    }

    /// Tokens that use `scope_map`.
    pub async fn tokens_using(&self, scope_map: &str) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT name FROM tokens WHERE scope_map = $1 ORDER BY name")
                .bind(scope_map)
                .fetch_all(&self.read)
                .await?,
        )
    }

    /// Inserts or replaces a token row (the caller read, changed and writes it back).
    pub async fn put_token(&self, t: &TokenRow) -> Result<()> {
        let mut tx = self.begin_write().await?;
        put_token(&mut *tx, t).await?;
        self.note_access_change(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn delete_token(&self, name: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let done = delete_token(&mut *tx, name).await?;
        self.note_access_change(&mut tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Applies `writes` in one transaction: all of them, or (on any error) none. It counts as
    /// an access change for the other replicas ([`Meta::shared_positions`]).
    ///
    /// A control-plane change that spans rows (a connected registry with its sync token, its
    /// scope map and its ancestors' scope maps) is planned by its caller under the caller's
    /// lock and written here, so neither an error nor a crash half-way leaves part of it.
    pub async fn apply(&self, writes: &[AccessWrite]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        for w in writes {
            match w {
                AccessWrite::InsertScopeMap {
                    name,
                    description,
                    actions,
                } => {
                    if !insert_scope_map(&mut *tx, name, description, actions).await? {
                        return Err(MetaError::Stale(format!(
                            "scope map {name:?} already exists"
                        )));
                    }
                }
                AccessWrite::UpdateScopeMap {
                    name,
                    description,
                    actions,
                } => {
                    if !update_scope_map(&mut *tx, name, description, actions).await? {
                        return Err(MetaError::Stale(format!("scope map {name:?} is gone")));
                    }
                }
                AccessWrite::PutScopeMap {
                    name,
                    description,
                    actions,
                } => {
                    if !insert_scope_map(&mut *tx, name, description, actions).await? {
                        update_scope_map(&mut *tx, name, description, actions).await?;
                    }
                }
                AccessWrite::DeleteScopeMap(name) => {
                    delete_scope_map(&mut *tx, name).await?;
                }
                AccessWrite::PutToken(t) => put_token(&mut *tx, t).await?,
                AccessWrite::DeleteToken(name) => {
                    delete_token(&mut *tx, name).await?;
                }
                AccessWrite::PutConnectedRegistry(row) => {
                    crate::connected::put_connected_registry(&mut *tx, row).await?
                }
                AccessWrite::DeleteConnectedRegistry(name) => {
                    crate::connected::delete_connected_registry(&mut *tx, name).await?;
                }
                AccessWrite::ReplaceRelayedTokens(tokens) => {
                    replace_relayed_tokens(&mut tx, tokens).await?
                }
            }
        }
        self.note_access_change(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// One row written by a control-plane change; see [`Meta::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessWrite {
    /// A new scope map; the change fails if the name is taken.
    InsertScopeMap {
        name: String,
        description: String,
        actions: Vec<String>,
    },
    /// New description and actions of an existing scope map; the change fails if it is gone.
    UpdateScopeMap {
        name: String,
        description: String,
        actions: Vec<String>,
    },
    /// A scope map created or replaced.
    PutScopeMap {
        name: String,
        description: String,
        actions: Vec<String>,
    },
    DeleteScopeMap(String),
    PutToken(TokenRow),
    DeleteToken(String),
    PutConnectedRegistry(Box<ConnectedRegistryRow>),
    DeleteConnectedRegistry(String),
    /// The client tokens relayed to descendants, all replaced: `(name, configuration JSON)`.
    ReplaceRelayedTokens(Vec<(String, String)>),
}

async fn insert_scope_map<'e>(
    ex: impl Executor<'e, Database = Any>,
    name: &str,
    description: &str,
    actions: &[String],
) -> Result<bool> {
    let json = serde_json::to_string(actions).map_err(|e| MetaError::Corrupt(e.to_string()))?;
    let res = sqlx::query(
        "INSERT INTO scope_maps (name, description, actions, created_at, updated_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(description)
    .bind(json)
    .bind(now_ms())
    .bind(now_ms())
    .execute(ex)
    .await?;
    Ok(res.rows_affected() > 0)
}

async fn update_scope_map<'e>(
    ex: impl Executor<'e, Database = Any>,
    name: &str,
    description: &str,
    actions: &[String],
) -> Result<bool> {
    let json = serde_json::to_string(actions).map_err(|e| MetaError::Corrupt(e.to_string()))?;
    let res = sqlx::query(
        "UPDATE scope_maps SET description = $1, actions = $2, updated_at = $3 WHERE name = $4",
    )
    .bind(description)
    .bind(json)
    .bind(now_ms())
    .bind(name)
    .execute(ex)
    .await?;
    Ok(res.rows_affected() > 0)
}

async fn delete_scope_map<'e>(ex: impl Executor<'e, Database = Any>, name: &str) -> Result<bool> {
    let res = sqlx::query("DELETE FROM scope_maps WHERE name = $1")
        .bind(name)
        .execute(ex)
        .await?;
    Ok(res.rows_affected() > 0)
}

async fn put_token<'e>(ex: impl Executor<'e, Database = Any>, t: &TokenRow) -> Result<()> {
    sqlx::query(&crate::upsert("tokens", TOKEN_COLUMNS))
        .bind(&t.name)
        .bind(&t.scope_map)
        .bind(&t.status)
        .bind(i64::from(t.is_admin))
        .bind(t.created_ms)
        .bind(now_ms())
        .bind(&t.passwords[0].hash)
        .bind(t.passwords[0].created_ms)
        .bind(t.passwords[0].expiry_ms)
        .bind(&t.passwords[1].hash)
        .bind(t.passwords[1].created_ms)
        .bind(t.passwords[1].expiry_ms)
        .execute(ex)
        .await?;
    Ok(())
}

async fn delete_token<'e>(ex: impl Executor<'e, Database = Any>, name: &str) -> Result<bool> {
    let res = sqlx::query("DELETE FROM tokens WHERE name = $1")
        .bind(name)
        .execute(ex)
        .await?;
    Ok(res.rows_affected() > 0)
}

async fn replace_relayed_tokens(
    tx: &mut sqlx::Transaction<'_, Any>,
    tokens: &[(String, String)],
) -> Result<()> {
    sqlx::query("DELETE FROM relayed_tokens")
        .execute(&mut **tx)
        .await?;
    for (name, config) in tokens {
        sqlx::query(
            "INSERT INTO relayed_tokens (name, config) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET config = excluded.config",
        )
        .bind(name)
        .bind(config)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, scope_map: &str) -> TokenRow {
        TokenRow {
            name: name.into(),
            scope_map: Some(scope_map.into()),
            status: "enabled".into(),
            is_admin: false,
            created_ms: 1,
            updated_ms: 1,
            passwords: Default::default(),
        }
    }

    fn map(name: &str, actions: &[&str]) -> AccessWrite {
        AccessWrite::InsertScopeMap {
            name: name.into(),
            description: String::new(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// A change whose last write fails leaves none of its earlier writes; one that succeeds
    /// leaves all of them.
    #[tokio::test]
    async fn apply_writes_all_or_nothing() {
        for (meta, _dir) in crate::tests::stores().await {
            apply_all_or_nothing_on(&meta).await;
        }
    }

    async fn apply_all_or_nothing_on(meta: &Meta) {
        let rules = ["repositories/app/content/read"];
        meta.apply(&[map("before", &rules)]).await.expect("apply");

        let failing = [
            map("new", &rules),
            AccessWrite::PutToken(token("new", "new")),
            AccessWrite::UpdateScopeMap {
                name: "before".into(),
                description: "changed".into(),
                actions: vec![],
            },
            AccessWrite::DeleteScopeMap("before".into()),
            AccessWrite::UpdateScopeMap {
                name: "missing".into(),
                description: String::new(),
                actions: vec![],
            },
        ];
        let err = meta
            .apply(&failing)
            .await
            .expect_err("a missing scope map fails");
        assert!(matches!(err, MetaError::Stale(_)), "{err}");
        assert!(meta.scope_map("new").await.expect("read").is_none());
        assert!(meta.token("new").await.expect("read").is_none());
        let before = meta.scope_map("before").await.expect("read").expect("kept");
        assert_eq!(before.actions, rules, "the earlier update was rolled back");
        assert_eq!(before.description, "");

        // Inserting a name that exists fails the same way.
        let err = meta
            .apply(&[map("other", &rules), map("before", &[])])
            .await
            .expect_err("a taken name fails");
        assert!(matches!(err, MetaError::Stale(_)), "{err}");
        assert!(meta.scope_map("other").await.expect("read").is_none());

        meta.apply(&failing[..4]).await.expect("apply");
        assert!(meta.token("new").await.expect("read").is_some());
        assert!(meta.scope_map("new").await.expect("read").is_some());
        assert!(meta.scope_map("before").await.expect("read").is_none());
    }
}
