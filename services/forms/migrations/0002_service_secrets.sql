-- Secrets the service makes once, on its first start, and every replica then shares: the key
-- that signs page tokens, so that a token outlives a restart and works at any replica.
CREATE TABLE service_secrets (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
