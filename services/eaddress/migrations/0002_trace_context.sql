-- The W3C trace context (`traceparent`) of the call that sent a message, so that the work it
-- causes later (its notices, its deemed delivery or expiry) links back to that call's trace.
ALTER TABLE messages ADD COLUMN trace_context TEXT;
