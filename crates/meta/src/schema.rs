//! The schema, as an ordered list of migrations for each database. SQLite records how many it
//! has applied in `PRAGMA user_version`, PostgreSQL in the table `outpost_schema`; pending ones
//! run at open, in one transaction. Append new migrations to both lists; never edit an applied
//! one. PostgreSQL support began at SQLite's migration 10, so its first migration creates the
//! whole schema as of then.

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
    // 10: secrets that every replica sharing this database must use alike (the access-token
    // signing key); only PostgreSQL deployments keep it here, SQLite ones in `keys/`
    r#"
    CREATE TABLE shared_secrets (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) STRICT;
    "#,
    // 11: tag lists in the distribution spec's order, case-insensitive (ties, such as `v1`
    // and `V1`, in byte order), read a page at a time from this index
    r#"
    CREATE INDEX tags_in_list_order ON tags(repo_id, lower(name), name);
    "#,
    // 12: a descendant's instance activated at an intermediate node while the root was
    // unreachable (the root is asked for its slot once it answers)
    r#"
    ALTER TABLE connected_registries ADD COLUMN activated_offline INTEGER NOT NULL DEFAULT 0;
    "#,
    // 13: garbage collection checks and deletes blobs in batches, by digest, in tables whose
    // keys begin with something else (PostgreSQL has had these since its first migration)
    r#"
    CREATE INDEX repo_blobs_by_digest ON repo_blobs(digest);
    CREATE INDEX manifest_refs_by_child ON manifest_refs(child);
    "#,
];

/// The PostgreSQL schema. Text that is compared or sorted (names, tags, digests) uses the "C"
/// collation: the catalog is ordered byte by byte and tag lists ASCII case-insensitively, as
/// on SQLite, whatever locale the database was created with.
pub(crate) const PG_MIGRATIONS: &[&str] = &[
    // 1: everything of SQLite's migrations 1-10
    r#"
    CREATE TABLE repositories (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name       TEXT COLLATE "C" NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE blobs (
        digest     TEXT COLLATE "C" PRIMARY KEY,
        size       BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE repo_blobs (
        repo_id BIGINT NOT NULL REFERENCES repositories(id),
        digest  TEXT COLLATE "C" NOT NULL REFERENCES blobs(digest),
        PRIMARY KEY (repo_id, digest)
    );
    CREATE INDEX repo_blobs_by_digest ON repo_blobs(digest);
    CREATE TABLE manifests (
        repo_id       BIGINT NOT NULL REFERENCES repositories(id),
        digest        TEXT COLLATE "C" NOT NULL,
        media_type    TEXT NOT NULL,
        artifact_type TEXT,
        subject       TEXT COLLATE "C",
        annotations   TEXT,
        content       BYTEA NOT NULL,
        created_at    BIGINT NOT NULL,
        PRIMARY KEY (repo_id, digest)
    );
    CREATE INDEX manifests_by_subject ON manifests(repo_id, subject) WHERE subject IS NOT NULL;
    CREATE TABLE manifest_refs (
        repo_id  BIGINT NOT NULL,
        manifest TEXT COLLATE "C" NOT NULL,
        child    TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (repo_id, manifest, child)
    );
    CREATE INDEX manifest_refs_by_child ON manifest_refs(child);
    CREATE TABLE tags (
        repo_id    BIGINT NOT NULL REFERENCES repositories(id),
        name       TEXT COLLATE "C" NOT NULL,
        digest     TEXT COLLATE "C" NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (repo_id, name)
    );
    CREATE INDEX tags_by_digest ON tags(repo_id, digest);
    CREATE TABLE events (
        seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at         BIGINT NOT NULL,
        repo       TEXT COLLATE "C" NOT NULL,
        kind       TEXT NOT NULL,
        tag        TEXT COLLATE "C",
        digest     TEXT,
        media_type TEXT,
        origin     TEXT
    );
    CREATE INDEX events_by_tag ON events(repo, tag, seq) WHERE tag IS NOT NULL;
    CREATE INDEX events_repository_deleted ON events(repo, seq) WHERE kind = 'repository_deleted';
    CREATE TABLE scope_maps (
        name        TEXT COLLATE "C" PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        actions     TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        updated_at  BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        name              TEXT COLLATE "C" PRIMARY KEY,
        scope_map         TEXT COLLATE "C",
        status            TEXT NOT NULL,
        is_admin          BIGINT NOT NULL DEFAULT 0,
        created_at        BIGINT NOT NULL,
        updated_at        BIGINT NOT NULL,
        password1_hash    TEXT,
        password1_created BIGINT,
        password1_expiry  BIGINT,
        password2_hash    TEXT,
        password2_created BIGINT,
        password2_expiry  BIGINT
    );
    CREATE TABLE connected_registries (
        name             TEXT COLLATE "C" PRIMARY KEY,
        mode             TEXT NOT NULL,
        parent           TEXT COLLATE "C",
        sync_token       TEXT NOT NULL,
        client_tokens    TEXT NOT NULL,
        schedule         TEXT NOT NULL,
        sync_window      TEXT,
        message_ttl      TEXT NOT NULL,
        log_level        TEXT NOT NULL,
        notifications    TEXT NOT NULL,
        gc_enabled       BIGINT NOT NULL,
        gc_schedule      TEXT NOT NULL,
        created_at       BIGINT NOT NULL,
        updated_at       BIGINT NOT NULL,
        activation       TEXT NOT NULL,
        instance_id      TEXT,
        last_activity    BIGINT,
        last_sync        BIGINT,
        sync_result      TEXT,
        reported_state   TEXT,
        status_details   TEXT NOT NULL,
        version          TEXT,
        login_server     TEXT,
        resync_requested BIGINT NOT NULL,
        cursor_lag       BIGINT,
        outbox_depth     BIGINT
    );
    CREATE INDEX connected_registries_by_parent ON connected_registries(parent);
    CREATE TABLE relayed_tokens (
        name   TEXT COLLATE "C" PRIMARY KEY,
        config TEXT NOT NULL
    );
    CREATE TABLE notifications (
        seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        received_at BIGINT NOT NULL,
        registry    TEXT COLLATE "C" NOT NULL,
        id          TEXT NOT NULL,
        time        TEXT NOT NULL,
        action      TEXT NOT NULL,
        repository  TEXT NOT NULL,
        tag         TEXT,
        digest      TEXT,
        media_type  TEXT,
        UNIQUE (registry, id)
    );
    CREATE INDEX notifications_by_registry ON notifications(registry, seq);
    CREATE INDEX notifications_by_age ON notifications(received_at);
    CREATE TABLE log_state (
        name  TEXT COLLATE "C" PRIMARY KEY,
        value BIGINT NOT NULL
    );
    CREATE TABLE shared_secrets (
        name  TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    "#,
    // 2: which replica holds each upload session (replicas forward requests to it)
    r#"
    CREATE TABLE upload_replicas (
        id         TEXT COLLATE "C" PRIMARY KEY,
        replica    TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX upload_replicas_by_age ON upload_replicas(created_at);
    "#,
    // 3: tag lists in the distribution spec's order (SQLite's migration 11)
    r#"
    CREATE INDEX tags_in_list_order ON tags(repo_id, lower(name), name);
    "#,
    // 4: activations granted while the root was unreachable (SQLite's migration 12)
    r#"
    ALTER TABLE connected_registries ADD COLUMN activated_offline BIGINT NOT NULL DEFAULT 0;
    "#,
];
