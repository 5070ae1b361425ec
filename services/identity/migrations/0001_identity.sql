-- Logins started and not yet completed. The key is the SHA-256 of the `state` sent to the
-- provider; a row is deleted as the login completes, so that a state works once.
CREATE TABLE logins (
    state_hash      TEXT PRIMARY KEY,
    provider_id     TEXT NOT NULL,
    client          TEXT NOT NULL,
    redirect_uri    TEXT NOT NULL,
    nonce           TEXT NOT NULL,
    verifier        TEXT NOT NULL,
    minimum_level   TEXT NOT NULL,
    expire_time_ms  BIGINT NOT NULL
);
CREATE INDEX logins_by_expiry ON logins (expire_time_ms);

-- Sessions: one per completed login, renewed by refresh tokens until it ends.
CREATE TABLE sessions (
    session_id      TEXT PRIMARY KEY,
    subject         TEXT NOT NULL,
    client          TEXT NOT NULL,
    person_json     TEXT NOT NULL,
    create_time_ms  BIGINT NOT NULL,
    expire_time_ms  BIGINT NOT NULL,
    end_time_ms     BIGINT,
    end_reason      TEXT
);
CREATE INDEX sessions_by_expiry ON sessions (expire_time_ms);

-- Refresh tokens, by the SHA-256 of the token. Each is used once; a second use ends the
-- session.
CREATE TABLE refresh_tokens (
    token_hash      TEXT PRIMARY KEY,
    session_id      TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    create_time_ms  BIGINT NOT NULL,
    used_time_ms    BIGINT
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

-- Mandates for authorised e-services.
CREATE TABLE mandates (
    mandate_id        TEXT PRIMARY KEY,
    principal         TEXT NOT NULL,
    services_json     TEXT NOT NULL,
    valid_from_ms     BIGINT NOT NULL,
    valid_until_ms    BIGINT NOT NULL,
    document_sha256   TEXT NOT NULL,
    identity_document TEXT NOT NULL,
    centre            TEXT NOT NULL,
    clerk             TEXT NOT NULL,
    clerk_json        TEXT NOT NULL,
    create_time_ms    BIGINT NOT NULL,
    revoke_time_ms    BIGINT,
    revoke_reason     TEXT,
    revoked_by        TEXT
);
CREATE INDEX mandates_by_principal ON mandates (principal, create_time_ms);
CREATE INDEX mandates_by_centre ON mandates (centre, create_time_ms);

-- What was done with mandates (and sessions), for audit.
CREATE TABLE audit_events (
    event_id     TEXT PRIMARY KEY,
    time_ms      BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    subject      TEXT NOT NULL,
    mandate_id   TEXT,
    client       TEXT NOT NULL,
    trace_id     TEXT NOT NULL,
    details      TEXT NOT NULL
);
CREATE INDEX audit_events_by_mandate ON audit_events (mandate_id, time_ms);
