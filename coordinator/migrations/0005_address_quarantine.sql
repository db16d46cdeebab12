-- A removed device's overlay address rests in quarantine before it is
-- handed out again: peers and DNS caches that still know the old device
-- must not reach a new one at its address. Addresses stay unique across
-- networks (one host may run a device in each of two networks).

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
