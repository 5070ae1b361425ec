-- The W3C trace context (`traceparent`) of the call that submitted an application, so that the
-- work it causes later (its deliveries to the institution) links back to that call's trace.
ALTER TABLE applications ADD COLUMN trace_context TEXT;
