-- The trace a saga belongs to: the W3C trace context of the span that started it
-- (the order request). What the saga does later by itself, rather than in answer to
-- a message that carries the trace (a step's timeout, a compensation's retry), is
-- traced as a child of that span, so one order stays one trace. NULL when tracing
-- was off at the start.
ALTER TABLE saga_state ADD COLUMN traceparent text, ADD COLUMN tracestate text;
