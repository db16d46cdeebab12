-- Overlay addresses are allocated per network (networks never reach each
-- other, so two networks may use the same address), lowest free first, and
-- a removed device's address rests in quarantine before it is handed out
-- again: peers and DNS caches that still know the old device must not
-- reach a new one at its address.
--
-- SQLite cannot drop the column-level UNIQUE constraints of the first
-- schema, so the table is rebuilt with per-network ones. Nothing refers to
-- devices by foreign key.

CREATE TABLE devices_new (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('mesh', 'wireguard')),
    device_key  TEXT UNIQUE,
    node_key    TEXT NOT NULL UNIQUE,
    disco_key   TEXT,
    hostname    TEXT NOT NULL,
    name        TEXT NOT NULL,
    os          TEXT NOT NULL,
    capabilities TEXT NOT NULL DEFAULT '{}',
    addr_seq    INTEGER NOT NULL,
    ipv4        TEXT NOT NULL,
    ipv6        TEXT NOT NULL,
    endpoints   TEXT NOT NULL DEFAULT '[]',
    ephemeral   INTEGER NOT NULL DEFAULT 0,
    preauth_key_id INTEGER REFERENCES preauth_keys(id) ON DELETE SET NULL,
    created_at  INTEGER NOT NULL,
    last_seen   INTEGER,
    home_region INTEGER,
    user_id     INTEGER REFERENCES users(id) ON DELETE CASCADE,
    approved    INTEGER NOT NULL DEFAULT 1,
    revoked_at  INTEGER,
    key_expires_at INTEGER,
    key_expiry_override INTEGER,
    key_expiry_handled INTEGER NOT NULL DEFAULT 0,
    key_issued_at INTEGER,
    UNIQUE (network_id, name),
    UNIQUE (network_id, addr_seq),
    UNIQUE (network_id, ipv4),
    UNIQUE (network_id, ipv6)
);

INSERT INTO devices_new (id, network_id, kind, device_key, node_key, disco_key, hostname,
    name, os, capabilities, addr_seq, ipv4, ipv6, endpoints, ephemeral, preauth_key_id,
    created_at, last_seen, home_region, user_id, approved, revoked_at, key_expires_at,
    key_expiry_override, key_expiry_handled, key_issued_at)
SELECT id, network_id, kind, device_key, node_key, disco_key, hostname,
    name, os, capabilities, addr_seq, ipv4, ipv6, endpoints, ephemeral, preauth_key_id,
    created_at, last_seen, home_region, user_id, approved, revoked_at, key_expires_at,
    key_expiry_override, key_expiry_handled, key_issued_at
FROM devices;

DROP TABLE devices;
ALTER TABLE devices_new RENAME TO devices;

CREATE INDEX devices_network ON devices(network_id);
CREATE INDEX devices_key_expiry ON devices(key_expires_at) WHERE key_expiry_handled = 0;

-- Addresses of removed devices, not handed out again before
-- released_at + the quarantine (a coordinator setting).
CREATE TABLE released_addresses (
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    addr_seq    INTEGER NOT NULL,
    released_at INTEGER NOT NULL,
    PRIMARY KEY (network_id, addr_seq)
);

-- The coordinator records the release itself, with its own clock, before
-- it deletes a device; this catches any other way a device row goes (an
-- older binary, a hand edit), so no address skips the quarantine. A network
-- deleted as a whole takes its quarantine with it.
CREATE TRIGGER devices_release_address AFTER DELETE ON devices
WHEN EXISTS (SELECT 1 FROM networks WHERE id = OLD.network_id)
BEGIN
    INSERT OR IGNORE INTO released_addresses (network_id, addr_seq, released_at)
    VALUES (OLD.network_id, OLD.addr_seq, CAST(strftime('%s', 'now') AS INTEGER));
END;
