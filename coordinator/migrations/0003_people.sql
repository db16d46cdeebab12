-- People in a network: users, members with roles, invites, device approval,
-- revocation (denylist), node-key expiry, device-code pairing, audit log.

CREATE TABLE users (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    username    TEXT NOT NULL UNIQUE,
    email       TEXT UNIQUE,
    created_at  INTEGER NOT NULL
);

-- A user's API tokens (the CLI acts as that user); stored hashed.
CREATE TABLE user_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE members (
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'member', 'guest')),
    status      TEXT NOT NULL CHECK (status IN ('pending', 'active')),
    joined_at   INTEGER NOT NULL,
    PRIMARY KEY (network_id, user_id)
);

CREATE INDEX members_user ON members(user_id);

ALTER TABLE networks ADD COLUMN owner_id INTEGER REFERENCES users(id);
ALTER TABLE networks ADD COLUMN require_device_approval INTEGER NOT NULL DEFAULT 0;
ALTER TABLE networks ADD COLUMN auto_approve_domains TEXT NOT NULL DEFAULT '[]';
ALTER TABLE networks ADD COLUMN auto_approve_emails TEXT NOT NULL DEFAULT '[]';
ALTER TABLE networks ADD COLUMN key_expiry_secs INTEGER NOT NULL DEFAULT 15552000;

CREATE TABLE invites (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'member', 'guest')),
    username    TEXT,
    email       TEXT,
    created_by  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    redeemed_by INTEGER REFERENCES users(id) ON DELETE SET NULL,
    redeemed_at INTEGER,
    revoked     INTEGER NOT NULL DEFAULT 0
);

ALTER TABLE preauth_keys ADD COLUMN user_id INTEGER REFERENCES users(id) ON DELETE CASCADE;

ALTER TABLE devices ADD COLUMN user_id INTEGER REFERENCES users(id) ON DELETE CASCADE;
ALTER TABLE devices ADD COLUMN approved INTEGER NOT NULL DEFAULT 1;
ALTER TABLE devices ADD COLUMN revoked_at INTEGER;
-- Unix time the node key expires; NULL: never.
ALTER TABLE devices ADD COLUMN key_expires_at INTEGER;
-- Per-device lifetime override in seconds (0: never); NULL: the network's.
ALTER TABLE devices ADD COLUMN key_expiry_override INTEGER;

-- Keys of removed or revoked devices: refused until an admin lifts them.
CREATE TABLE denylist (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('device', 'node')),
    key         TEXT NOT NULL,
    device_name TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (network_id, key)
);

-- Device-code pairing: a device waiting for a member to approve its code.
CREATE TABLE device_codes (
    code        TEXT PRIMARY KEY,
    device_key  TEXT NOT NULL UNIQUE,
    hostname    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    network_id  INTEGER REFERENCES networks(id) ON DELETE CASCADE,
    approved_by INTEGER REFERENCES users(id) ON DELETE CASCADE,
    -- The single-use key last handed to the device (only its hash is kept,
    -- in preauth_keys); a new poll replaces it.
    preauth_key_id INTEGER REFERENCES preauth_keys(id) ON DELETE SET NULL
);

-- Append-only: nothing updates or deletes rows here.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    network_id  INTEGER NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    actor_kind  TEXT NOT NULL CHECK (actor_kind IN ('user', 'device', 'system')),
    actor_id    INTEGER,
    actor_name  TEXT,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    old_value   TEXT,
    new_value   TEXT
);

CREATE INDEX audit_network_at ON audit_events(network_id, at);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;

-- The first admin token becomes the first user's: the owner of every
-- network that exists already.
INSERT INTO users (username, created_at)
    SELECT 'admin', created_at FROM admin_tokens ORDER BY id LIMIT 1;
INSERT INTO user_tokens (user_id, token_hash, created_at)
    SELECT (SELECT id FROM users WHERE username = 'admin'), token_hash, created_at FROM admin_tokens;
UPDATE networks SET owner_id = (SELECT id FROM users WHERE username = 'admin');
INSERT INTO members (network_id, user_id, role, status, joined_at)
    SELECT id, owner_id, 'admin', 'active', created_at FROM networks WHERE owner_id IS NOT NULL;
UPDATE devices SET user_id = (SELECT owner_id FROM networks WHERE networks.id = devices.network_id);
UPDATE preauth_keys SET user_id = (SELECT owner_id FROM networks WHERE networks.id = preauth_keys.network_id);
DROP TABLE admin_tokens;

-- Set once the expiry of the device's current node key has been acted on
-- (audited, relays told, stream closed); cleared by a new key.
ALTER TABLE devices ADD COLUMN key_expiry_handled INTEGER NOT NULL DEFAULT 0;
-- The sweeper looks every few seconds for keys that expired and are not
-- handled yet: only those rows are indexed.
CREATE INDEX devices_key_expiry ON devices(key_expires_at) WHERE key_expiry_handled = 0;

-- Network-wide key rotation: devices whose key was issued before the
-- request renew it (at once when connected, else when they next connect).
ALTER TABLE devices ADD COLUMN key_issued_at INTEGER;
ALTER TABLE networks ADD COLUMN rotation_requested_at INTEGER;
