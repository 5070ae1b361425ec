-- Requests that changed something, by caller and client-chosen request id, so that a retry
-- finds the first result (see the platform's `requests` module). `fingerprint` is the SHA-256
-- of the request message, in hex; `resource` names what the request produced.
CREATE TABLE platform_requests (
    caller TEXT NOT NULL,
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    resource TEXT NOT NULL,
    create_time_ms BIGINT NOT NULL,
    PRIMARY KEY (caller, request_id)
);

-- Pruning removes the oldest first.
CREATE INDEX platform_requests_by_time ON platform_requests (create_time_ms);
