-- Forms, their immutable versions, and the request ids that make mutations idempotent.
-- Times are milliseconds since the Unix epoch (UTC).
CREATE TABLE forms (
    form_id          TEXT PRIMARY KEY,
    owner_class      TEXT NOT NULL,
    owner_code       TEXT NOT NULL,
    title_lv         TEXT NOT NULL,
    title_en         TEXT NOT NULL,
    description_lv   TEXT NOT NULL,
    description_en   TEXT NOT NULL,
    latest_version   BIGINT NOT NULL,
    create_time_ms   BIGINT NOT NULL,
    update_time_ms   BIGINT NOT NULL
);
CREATE INDEX forms_by_owner ON forms (owner_class, owner_code, form_id);

CREATE TABLE form_versions (
    form_id             TEXT NOT NULL REFERENCES forms (form_id),
    version             BIGINT NOT NULL,
    schema_json         TEXT NOT NULL,
    fields_json         TEXT NOT NULL,
    breaking            BIGINT NOT NULL,
    deprecation_reason  TEXT,
    deprecate_time_ms   BIGINT,
    create_time_ms      BIGINT NOT NULL,
    PRIMARY KEY (form_id, version)
);

CREATE TABLE requests (
    caller          TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    method          TEXT NOT NULL,
    resource        TEXT NOT NULL,
    create_time_ms  BIGINT NOT NULL,
    PRIMARY KEY (caller, request_id)
);
