-- Secrets a service makes once, on its first start, and every replica then shares (such as the
-- key that signs page tokens). `IF NOT EXISTS`: services that kept this table themselves
-- before the platform did have it already, with the same columns.
CREATE TABLE IF NOT EXISTS service_secrets (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
