-- Crank Mesh coordinator: first schema.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE admin_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE networks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE preauth_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    reusable    INTEGER NOT NULL,
    ephemeral   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked     INTEGER NOT NULL DEFAULT 0,
    used_count  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('mesh', 'wireguard')),
    -- Ed25519 identity; NULL for stock WireGuard devices.
    device_key  TEXT UNIQUE,
    node_key    TEXT NOT NULL UNIQUE,
    disco_key   TEXT,
    hostname    TEXT NOT NULL,
    name        TEXT NOT NULL,
    os          TEXT NOT NULL,
    capabilities TEXT NOT NULL DEFAULT '{}',
    addr_seq    INTEGER NOT NULL UNIQUE,
    ipv4        TEXT NOT NULL UNIQUE,
    ipv6        TEXT NOT NULL UNIQUE,
    endpoints   TEXT NOT NULL DEFAULT '[]',
    ephemeral   INTEGER NOT NULL DEFAULT 0,
    preauth_key_id INTEGER REFERENCES preauth_keys(id) ON DELETE SET NULL,
    created_at  INTEGER NOT NULL,
    last_seen   INTEGER,
    UNIQUE (network_id, name)
);

CREATE INDEX devices_network ON devices(network_id);
