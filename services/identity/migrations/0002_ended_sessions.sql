-- Ended sessions by the time they ended: the gateway asks for those ended since it last asked,
-- to refuse their access tokens before they expire.
CREATE INDEX sessions_by_end ON sessions (end_time_ms);
