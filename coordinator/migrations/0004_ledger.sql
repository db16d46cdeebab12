-- Compute rules per network, and the credit ledger: delivered receipts,
-- double-entry ledger entries in micro-credits, cached balances, and job
-- events. Receipts, entries and events are append-only.

-- JSON of `ComputeRules`; '{}' reads as the defaults.
ALTER TABLE networks ADD COLUMN compute_rules TEXT NOT NULL DEFAULT '{}';

-- One row per (job, chunk) a worker was credited for. Devices are named by
-- id without a foreign key: the record outlives a removed device.
CREATE TABLE receipts (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id          INTEGER NOT NULL REFERENCES networks(id),
    job_id              TEXT NOT NULL,
    chunk_id            INTEGER NOT NULL,
    -- SHA-256 of the signed payload: an identical delivery has the same.
    receipt_hash        TEXT NOT NULL,
    worker_device_id    INTEGER NOT NULL,
    submitter_device_id INTEGER NOT NULL,
    workload            TEXT NOT NULL,
    model               TEXT NOT NULL,
    runtime_ms          INTEGER NOT NULL,
    units               INTEGER NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('ok', 'failed', 'cancelled')),
    ticket_hash         TEXT NOT NULL,
    received_at         INTEGER NOT NULL,
    -- The signed receipt as delivered (JSON of `Signed`).
    body                TEXT NOT NULL,
    UNIQUE (network_id, job_id, chunk_id)
);

CREATE INDEX receipts_ticket ON receipts(network_id, ticket_hash);
CREATE INDEX receipts_worker ON receipts(worker_device_id);
CREATE INDEX receipts_submitter ON receipts(submitter_device_id);

-- Accounts: 'member:<user id>', 'pool', 'mint'.
CREATE TABLE ledger_entries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id),
    job_id      TEXT NOT NULL,
    chunk_id    INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('grant', 'mint', 'burn')),
    debit       TEXT NOT NULL,
    credit      TEXT NOT NULL,
    amount      INTEGER NOT NULL CHECK (amount > 0),
    receipt_id  INTEGER REFERENCES receipts(id),
    trace_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    CHECK (debit <> credit),
    UNIQUE (network_id, job_id, chunk_id, kind)
);

CREATE INDEX ledger_debit ON ledger_entries(network_id, debit);
CREATE INDEX ledger_credit ON ledger_entries(network_id, credit);
CREATE INDEX ledger_receipt ON ledger_entries(receipt_id);

-- Balances, kept by the trigger below in the transaction of each entry:
-- always the sum of the entries.
CREATE TABLE ledger_balances (
    network_id  INTEGER NOT NULL REFERENCES networks(id),
    account     TEXT NOT NULL,
    balance     INTEGER NOT NULL,
    PRIMARY KEY (network_id, account)
) WITHOUT ROWID;

CREATE TRIGGER ledger_post AFTER INSERT ON ledger_entries
BEGIN
    INSERT INTO ledger_balances (network_id, account, balance)
        VALUES (NEW.network_id, NEW.debit, -NEW.amount)
        ON CONFLICT (network_id, account) DO UPDATE SET balance = balance - NEW.amount;
    INSERT INTO ledger_balances (network_id, account, balance)
        VALUES (NEW.network_id, NEW.credit, NEW.amount)
        ON CONFLICT (network_id, account) DO UPDATE SET balance = balance + NEW.amount;
END;

CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END;
CREATE TRIGGER receipts_no_update BEFORE UPDATE ON receipts
BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
CREATE TRIGGER receipts_no_delete BEFORE DELETE ON receipts
BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;

CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id  INTEGER NOT NULL REFERENCES networks(id),
    job_id      TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('job_completed', 'job_failed', 'credits_minted', 'credits_burned')),
    trace_id    TEXT NOT NULL,
    -- JSON: chunk, devices, runtime, amounts.
    detail      TEXT NOT NULL,
    at          INTEGER NOT NULL
);

CREATE INDEX job_events_job ON job_events(network_id, job_id);

CREATE TRIGGER job_events_no_update BEFORE UPDATE ON job_events
BEGIN SELECT RAISE(ABORT, 'job events are append-only'); END;
CREATE TRIGGER job_events_no_delete BEFORE DELETE ON job_events
BEGIN SELECT RAISE(ABORT, 'job events are append-only'); END;

-- Members active before the ledger existed get the default initial grant
-- (100 credits) now; later members get their network's at activation.
INSERT INTO ledger_entries (network_id, job_id, chunk_id, kind, debit, credit, amount, trace_id, created_at)
    SELECT network_id, 'grant:' || user_id, 0, 'grant', 'mint', 'member:' || user_id, 100000000,
           'grant:' || user_id, CAST(strftime('%s', 'now') AS INTEGER)
    FROM members WHERE status = 'active';
