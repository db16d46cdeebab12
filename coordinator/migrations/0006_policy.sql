-- Access policy and names.

-- The network's access policy as its admin wrote it (JSON with comments);
-- NULL: the default policy (members reach each other's devices).
ALTER TABLE networks ADD COLUMN policy TEXT;
-- MagicDNS settings an admin chose (extra records, split DNS, resolvers),
-- as JSON.
ALTER TABLE networks ADD COLUMN dns TEXT NOT NULL DEFAULT '{}';

-- Tags a device carries (JSON array of "tag:NAME"); the policy names
-- devices by them.
ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
-- Tags every device registered with the key gets.
ALTER TABLE preauth_keys ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
