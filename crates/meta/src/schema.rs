//! The SQLite schema as an ordered list of migrations. `PRAGMA user_version` records how many
//! have been applied; each runs once, in its own transaction, at open. Append new migrations;
//! never edit an applied one.

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the registry core
    r#"
    CREATE TABLE repositories (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE blobs (
        digest     TEXT PRIMARY KEY,
        size       INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;

    -- A repository may serve a blob only if it is linked here (pushed, mounted or referenced).
    CREATE TABLE repo_blobs (
        repo_id INTEGER NOT NULL REFERENCES repositories(id),
        digest  TEXT NOT NULL REFERENCES blobs(digest),
        PRIMARY KEY (repo_id, digest)
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE manifests (
        repo_id       INTEGER NOT NULL REFERENCES repositories(id),
        digest        TEXT NOT NULL,
        media_type    TEXT NOT NULL,
        artifact_type TEXT,
        subject       TEXT,
        annotations   TEXT,
        content       BLOB NOT NULL,
        created_at    INTEGER NOT NULL,
        PRIMARY KEY (repo_id, digest)
    ) STRICT;
    CREATE INDEX manifests_by_subject ON manifests(repo_id, subject) WHERE subject IS NOT NULL;

    -- What each manifest references (blobs and child manifests), for garbage collection.
    CREATE TABLE manifest_refs (
        repo_id  INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        child    TEXT NOT NULL,
        PRIMARY KEY (repo_id, manifest, child)
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE tags (
        repo_id    INTEGER NOT NULL REFERENCES repositories(id),
        name       TEXT NOT NULL,
        digest     TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (repo_id, name)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX tags_by_digest ON tags(repo_id, digest);

    -- Every state change, appended in the same transaction as the change. Children sync from
    -- this log and the outbox replays it.
    CREATE TABLE events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        at         INTEGER NOT NULL,
        repo       TEXT NOT NULL,
        kind       TEXT NOT NULL,
        tag        TEXT,
        digest     TEXT,
        media_type TEXT
    ) STRICT;
    "#,
    // 2: access control (tokens and scope maps)
    r#"
    CREATE TABLE scope_maps (
        name        TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        actions     TEXT NOT NULL,            -- JSON array of rule strings
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE tokens (
        name              TEXT PRIMARY KEY,
        scope_map         TEXT,
        status            TEXT NOT NULL,
        is_admin          INTEGER NOT NULL DEFAULT 0,
        created_at        INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL,
        password1_hash    TEXT,
        password1_created INTEGER,
        password1_expiry  INTEGER,
        password2_hash    TEXT,
        password2_created INTEGER,
        password2_expiry  INTEGER
    ) STRICT;
    "#,
    // 3: connected registries (the control plane)
    r#"
    CREATE TABLE connected_registries (
        name             TEXT PRIMARY KEY,
        mode             TEXT NOT NULL,
        parent           TEXT,                -- NULL: the parent is this (root) registry
        sync_token       TEXT NOT NULL,
        client_tokens    TEXT NOT NULL,       -- JSON array of token names
        schedule         TEXT NOT NULL,
        sync_window      TEXT,
        message_ttl      TEXT NOT NULL,
        log_level        TEXT NOT NULL,
        notifications    TEXT NOT NULL,       -- JSON array
        gc_enabled       INTEGER NOT NULL,
        gc_schedule      TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        activation       TEXT NOT NULL,
        instance_id      TEXT,
        last_activity    INTEGER,
        last_sync        INTEGER,
        sync_result      TEXT,
        reported_state   TEXT,
        status_details   TEXT NOT NULL,       -- JSON array
        version          TEXT,
        login_server     TEXT,
        resync_requested INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX connected_registries_by_parent ON connected_registries(parent);
    "#,
    // 4: where each event came from, so a ReadWrite site sends up only its clients' changes
    r#"
    ALTER TABLE events ADD COLUMN origin TEXT;
    "#,
    // 5: how far behind each connected registry reported itself
    r#"
    ALTER TABLE connected_registries ADD COLUMN cursor_lag INTEGER;
    ALTER TABLE connected_registries ADD COLUMN outbox_depth INTEGER;
    "#,
    // 6: a tag's history, for telling a real sync conflict from a site moving its own tag
    r#"
    CREATE INDEX events_by_tag ON events(repo, tag, seq) WHERE tag IS NOT NULL;
    "#,
    // 7: client tokens of an intermediate node's descendants, kept only to be handed down in
    // their configuration (they do not authenticate anyone at this node)
    r#"
    CREATE TABLE relayed_tokens (
        name   TEXT PRIMARY KEY,
        config TEXT NOT NULL     -- JSON, as the parent sent it
    ) STRICT;
    "#,
    // 8: notifications received from connected registries (kept at the root)
    r#"
    CREATE TABLE notifications (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at INTEGER NOT NULL,
        registry    TEXT NOT NULL,
        id          TEXT NOT NULL,
        time        TEXT NOT NULL,
        action      TEXT NOT NULL,
        repository  TEXT NOT NULL,
        tag         TEXT,
        digest      TEXT,
        media_type  TEXT,
        UNIQUE (registry, id)
    ) STRICT;
    CREATE INDEX notifications_by_registry ON notifications(registry, seq);
    CREATE INDEX notifications_by_age ON notifications(received_at);
    "#,
    // 9: how far the event log was pruned, and a repository's deletions by number (pruning
    // asks whether a repository was deleted after a tag was set)
    r#"
    CREATE TABLE log_state (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX events_repository_deleted ON events(repo, seq) WHERE kind = 'repository_deleted';
    "#,
];
