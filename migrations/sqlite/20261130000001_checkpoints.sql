-- The SQLite checkpoint store: the same tables as PostgreSQL's (see migrations/postgres),
-- in one migration because the store starts here. Times are integer milliseconds since the
-- Unix epoch: SQLite has no timestamp type, and integers compare and subtract exactly.

-- One row per event (not per SQS message), keyed by the idempotency key from the payload.
create table checkpoints (
    scope              text    not null,
    idempotency_key    text    not null,
    status             text    not null default 'in_progress'
                       check (status in ('in_progress', 'complete', 'failed')),
    -- Completed steps in order, as JSON: [{"name": ..., "output": ..., "completed_at": ...}].
    steps              text    not null default '[]',
    -- The lease: which claim may write this row, and until when. Null owner = nobody.
    lease_owner        text,
    lease_expires_at   integer,
    -- How long the holder's run may last at most (see migrations/postgres, run_deadline).
    run_deadline_at    integer,
    attempts           integer not null default 1,
    -- SHA-256 of the event body, to notice the same key arriving with different content.
    payload_sha256     text    not null,
    first_message_id   text    not null,
    last_message_id    text    not null,
    last_error         text,
    -- The pass of the latest claim: a failed event is claimed again only by a later one.
    requeue_generation integer not null default 0,
    redrive_count      integer not null default 0,
    -- Digests of the fingerprinted fields as first seen ({"/pointer": "digest"}).
    payload_fields     text,
    created_at         integer not null,
    updated_at         integer not null,
    completed_at       integer,
    primary key (scope, idempotency_key)
);

-- Retention pruning and operator listings look rows up by status and age.
create index checkpoints_status_updated_at on checkpoints (status, updated_at);

-- Messages that ended for good, kept whole for inspection, export and requeue.
create table dead_letters (
    id              integer primary key autoincrement,
    scope           text    not null,
    idempotency_key text    not null,
    queue_url       text    not null,
    message_id      text    not null,
    body            text    not null,
    -- Message attributes as {"name": {"type": "String", "value": "..."}}.
    attributes      text    not null default '{}',
    reason          text    not null,
    error           text    not null,
    attempts        integer not null,
    redrive_count   integer not null,
    created_at      integer not null,
    -- Set by `dead-letters requeue`: sent back on purpose.
    requeued_at     integer
);

create index dead_letters_scope_created_at on dead_letters (scope, created_at);

-- One row per `sqs-worker redrive` run: the operators' audit trail.
create table redrives (
    id               integer primary key autoincrement,
    operator         text    not null,
    dlq_url          text    not null,
    target_url       text    not null,
    max_redrives     integer not null,
    dry_run          boolean not null,
    redriven         integer not null default 0,
    skipped_complete integer not null default 0,
    exhausted        integer not null default 0,
    failed           integer not null default 0,
    started_at       integer not null,
    finished_at      integer
);
