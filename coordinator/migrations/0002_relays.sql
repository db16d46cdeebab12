-- Relays: their tokens (for admission checks) and each device's home region.

CREATE TABLE relay_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

ALTER TABLE devices ADD COLUMN home_region INTEGER;
