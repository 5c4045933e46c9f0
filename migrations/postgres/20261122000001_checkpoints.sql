-- One row per event (not per SQS message): the idempotency key comes from the payload, so
-- every delivery of the same event — duplicates, redeliveries, DLQ redrives — meets this row.
create table checkpoints (
    scope            text        not null,
    idempotency_key  text        not null,
    status           text        not null default 'in_progress'
                     check (status in ('in_progress', 'complete', 'failed')),
    -- Completed steps in order: [{"name": ..., "output": ..., "completed_at": ...}].
    steps            jsonb       not null default '[]'::jsonb,
    -- The lease: who may write this row, and until when. Null owner = nobody holds it.
    lease_owner      text,
    lease_expires_at timestamptz,
    attempts         integer     not null default 1,
    -- SHA-256 of the event body, to notice the same key arriving with different content.
    payload_sha256   text        not null,
    first_message_id text        not null,
    last_message_id  text        not null,
    last_error       text,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    completed_at     timestamptz,
    primary key (scope, idempotency_key)
);

-- Retention pruning and operator listings look rows up by status and age.
create index checkpoints_status_updated_at on checkpoints (status, updated_at);
