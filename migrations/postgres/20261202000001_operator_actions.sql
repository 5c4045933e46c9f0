-- The console's operator log: one row per action an operator took on a message (or on a
-- DLQ, for a bulk action), with the body's fingerprints before and after an edit. Read
-- newest first.
create table operator_actions (
    id              bigserial   primary key,
    recorded_at     timestamptz not null default now(),
    operator        text        not null,
    -- redrive, delete, edit_redrive, bulk_redrive, requeue.
    action          text        not null,
    queue_url       text        not null,
    -- Empty for a bulk action.
    message_id      text        not null,
    idempotency_key text,
    before_sha256   text,
    after_sha256    text,
    detail          text        not null
);

create index operator_actions_recorded_at on operator_actions (recorded_at desc, id desc);
