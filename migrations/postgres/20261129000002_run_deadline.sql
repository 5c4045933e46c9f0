-- How long the current holder's run may last at most (its claim plus --max-handler-time, or
-- the Lambda invocation's deadline). A delivery of an event running elsewhere is put back
-- until then instead of until the lease ends: a lease is renewed every third of the
-- visibility timeout, so deferring by the lease would receive the duplicate again and again
-- and push it into the DLQ through maxReceiveCount while the event runs.
alter table checkpoints
    add column run_deadline_at timestamptz;
