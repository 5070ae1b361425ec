-- The figures of every inbox (how many deliveries wait, are leased or parked, and the oldest)
-- are counted every few seconds: this index holds only the deliveries not yet acknowledged, so
-- the count never reads the acknowledged ones, which only grow.
CREATE INDEX deliveries_unacknowledged ON deliveries (inbox, state, id) WHERE state <> 'acked';
