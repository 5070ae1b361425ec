-- The catalogue: services, centres and destinations, each a JSON document by kind and id.
CREATE TABLE catalogue_entries (
    kind            TEXT NOT NULL,
    id              TEXT NOT NULL,
    body            TEXT NOT NULL,
    update_time_ms  BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);

-- Accepted applications with their routing decision and provenance (JSON). The id is a
-- UUIDv7, so ordering by id is ordering by acceptance.
CREATE TABLE applications (
    id                 TEXT PRIMARY KEY,
    service_id         TEXT NOT NULL,
    form_id            TEXT NOT NULL,
    form_version       TEXT NOT NULL,
    data_json          TEXT NOT NULL,
    municipality_code  TEXT NOT NULL,
    destination        TEXT NOT NULL,
    provenance         TEXT NOT NULL,
    applicant          TEXT NOT NULL,
    centre_id          TEXT NOT NULL,
    content_sha256     TEXT NOT NULL,
    accept_time_ms     BIGINT NOT NULL,
    status             TEXT NOT NULL
);

-- Every status step, numbered from 1 per application. A decision document is kept base64.
CREATE TABLE status_changes (
    application_id       TEXT NOT NULL,
    seq                  INTEGER NOT NULL,
    status               TEXT NOT NULL,
    note                 TEXT NOT NULL,
    time_ms              BIGINT NOT NULL,
    by_member            TEXT NOT NULL,
    decision_title       TEXT,
    decision_media_type  TEXT,
    decision_base64      TEXT,
    decision_sha256      TEXT,
    PRIMARY KEY (application_id, seq)
);

-- One delivery per application to its destination's inbox. state: ready, leased, acked,
-- parked. consumer: the stream (or the subsystem's pulls) it was last leased to.
CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    application_id   TEXT NOT NULL,
    inbox            TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL,
    lease_until_ms   BIGINT,
    consumer         TEXT,
    park_time_ms     BIGINT,
    ack_time_ms      BIGINT
);
CREATE INDEX deliveries_by_inbox ON deliveries (inbox, state, id);
CREATE INDEX deliveries_by_consumer ON deliveries (consumer, state);

-- Decisions for applicants' e-addresses (or for pickup at a centre), drained by the
-- e-address service.
CREATE TABLE notifications (
    id               TEXT PRIMARY KEY,
    application_id   TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    pickup_centre    TEXT NOT NULL,
    status           TEXT NOT NULL,
    payload          TEXT NOT NULL,
    create_time_ms   BIGINT NOT NULL,
    drain_time_ms    BIGINT
);
CREATE INDEX notifications_undrained ON notifications (drain_time_ms, id);

-- Every contact at a centre. service_key is the service id or `topic:<topic>`.
CREATE TABLE service_cases (
    id              TEXT PRIMARY KEY,
    centre_id       TEXT NOT NULL,
    clerk           TEXT NOT NULL,
    service_id      TEXT NOT NULL,
    institution     TEXT NOT NULL,
    topic           TEXT NOT NULL,
    service_key     TEXT NOT NULL,
    channel         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    start_time_ms   BIGINT NOT NULL,
    end_time_ms     BIGINT NOT NULL,
    application_id  TEXT
);
CREATE INDEX service_cases_by_start ON service_cases (start_time_ms);
