-- Messages that ended for good: a failure on a DLQ redrive's final pass, or a redrive that
-- found the message's redrive count already at the maximum. Kept whole (body and
-- attributes) so an operator can inspect, export or deliberately requeue them.
create table dead_letters (
    id              bigserial   primary key,
    scope           text        not null,
    idempotency_key text        not null,
    queue_url       text        not null,
    message_id      text        not null,
    body            text        not null,
    -- Message attributes as {"name": {"type": "String", "value": "..."}}.
    attributes      jsonb       not null default '{}'::jsonb,
    reason          text        not null,
    error           text        not null,
    attempts        integer     not null,
    redrive_count   integer     not null,
    created_at      timestamptz not null default now(),
    -- Set by `dead-letters requeue`: sent back on purpose, markers reset.
    requeued_at     timestamptz
);

create index dead_letters_scope_created_at on dead_letters (scope, created_at);

-- One row per `sqs-worker redrive` run: the operators' audit trail.
create table redrives (
    id               bigserial   primary key,
    operator         text        not null,
    dlq_url          text        not null,
    target_url       text        not null,
    max_redrives     integer     not null,
    dry_run          boolean     not null,
    redriven         integer     not null default 0,
    skipped_complete integer     not null default 0,
    exhausted        integer     not null default 0,
    failed           integer     not null default 0,
    started_at       timestamptz not null default now(),
    finished_at      timestamptz
);
