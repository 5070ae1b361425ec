-- The e-address: mailboxes, messages and their deliveries, the evidence log, notices.
-- Portable SQL: the same on SQLite and PostgreSQL. Times are Unix milliseconds (UTC); flags are
-- 0/1 integers.

-- A person's mailbox once it was activated or configured; companies' and institutions' are
-- active by law and have a row only when configured.
CREATE TABLE mailboxes (
    address           TEXT PRIMARY KEY,
    active            BIGINT NOT NULL,
    notice_email      TEXT NOT NULL,
    activate_time_ms  BIGINT,
    update_time_ms    BIGINT NOT NULL
);

-- People an owner lets read their mailbox.
CREATE TABLE delegates (
    mailbox   TEXT NOT NULL,
    delegate  TEXT NOT NULL,
    PRIMARY KEY (mailbox, delegate)
);
CREATE INDEX delegates_by_delegate ON delegates (delegate);

-- Uploaded content, stored on disk under its SHA-256; removed when no message names it a day
-- after upload.
CREATE TABLE blobs (
    sha256          TEXT PRIMARY KEY,
    size            BIGINT NOT NULL,
    upload_time_ms  BIGINT NOT NULL
);

-- One message, whatever the number of its recipients. attachments: JSON array of
-- {file_name, media_type, size, sha256}.
CREATE TABLE messages (
    id                     TEXT PRIMARY KEY,
    thread_id              TEXT NOT NULL,
    sender                 TEXT NOT NULL,
    subject                TEXT NOT NULL,
    body                   TEXT NOT NULL,
    document_type          TEXT NOT NULL,
    delivery_rule          TEXT NOT NULL,
    hidden_from_delegates  BIGINT NOT NULL,
    content_sha256         TEXT NOT NULL,
    attachments            TEXT NOT NULL,
    accept_time_ms         BIGINT NOT NULL,
    recipient_count        BIGINT NOT NULL
);

-- The message's attachments, by content, so that uploaded content in use is never removed.
CREATE TABLE message_blobs (
    message_id  TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    PRIMARY KEY (message_id, sha256)
);
CREATE INDEX message_blobs_by_blob ON message_blobs (sha256);

-- Who takes part in a thread (its senders and recipients): who may reply in it.
CREATE TABLE thread_parties (
    thread_id  TEXT NOT NULL,
    party      TEXT NOT NULL,
    PRIMARY KEY (thread_id, party)
);

-- A message for one recipient. state: accepted, placed, retrieved, deemed_delivered,
-- not_delivered. due_kind: deemed (deemed delivered at due_time_ms unless opened first),
-- expires (not delivered at due_time_ms unless opened first), or empty. consumer,
-- lease_until_ms and attempts: an institution's incoming stream's lease on it.
CREATE TABLE deliveries (
    message_id        TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    state             TEXT NOT NULL,
    accept_time_ms    BIGINT NOT NULL,
    place_time_ms     BIGINT,
    retrieve_time_ms  BIGINT,
    due_kind          TEXT NOT NULL,
    due_time_ms       BIGINT,
    consumer          TEXT,
    lease_until_ms    BIGINT,
    attempts          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, recipient)
);
CREATE INDEX deliveries_by_mailbox ON deliveries (recipient, accept_time_ms, message_id);
CREATE INDEX deliveries_by_state ON deliveries (state, accept_time_ms);
CREATE INDEX deliveries_due ON deliveries (state, due_time_ms);

-- Evidence events not yet in the log: written in the transaction of what they record, signed
-- and appended by the log's writer (in id order, ids being time-ordered).
CREATE TABLE evidence_pending (
    id          TEXT PRIMARY KEY,
    message_id  TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    event       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    time_ms     BIGINT NOT NULL
);

-- The evidence log: record (the canonical JSON bytes as text), its leaf hash (hex) and
-- signature (base64).
CREATE TABLE evidence_log (
    log_index   BIGINT PRIMARY KEY,
    message_id  TEXT NOT NULL,
    recipient   TEXT NOT NULL,
    record      TEXT NOT NULL,
    leaf_hash   TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    signature   TEXT NOT NULL
);
CREATE INDEX evidence_log_by_message ON evidence_log (message_id, log_index);

-- The log's size; its one row is locked by each append, so that appends are serial across
-- replicas.
CREATE TABLE evidence_head (
    id    BIGINT PRIMARY KEY,
    size  BIGINT NOT NULL
);
INSERT INTO evidence_head (id, size) VALUES (1, 0);

-- Every key that signed evidence (public part, base64), kept for ever.
CREATE TABLE evidence_keys (
    key_id          TEXT PRIMARY KEY,
    public_key      TEXT NOT NULL,
    create_time_ms  BIGINT NOT NULL
);

-- Signed tree heads: head (the signed bytes, base64), signature (base64).
CREATE TABLE tree_heads (
    tree_size  BIGINT PRIMARY KEY,
    root_hash  TEXT NOT NULL,
    time_ms    BIGINT NOT NULL,
    head       TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    signature  TEXT NOT NULL
);

-- Content-free e-mail notices: sent at sent_time_ms, or given up (gave_up = 1) after permanent
-- failure or too many attempts.
CREATE TABLE notices (
    id               TEXT PRIMARY KEY,
    message_id       TEXT NOT NULL,
    mailbox          TEXT NOT NULL,
    email            TEXT NOT NULL,
    attempts         BIGINT NOT NULL,
    next_attempt_ms  BIGINT NOT NULL,
    sent_time_ms     BIGINT,
    gave_up          BIGINT NOT NULL,
    last_error       TEXT NOT NULL
);
CREATE INDEX notices_due ON notices (sent_time_ms, gave_up, next_attempt_ms);
