-- The console's operator log (see migrations/postgres, operator_actions): one row per
-- action an operator took, read newest first. Times in epoch milliseconds.
create table operator_actions (
    id              integer primary key autoincrement,
    recorded_at     integer not null,
    operator        text    not null,
    -- redrive, delete, edit_redrive, bulk_redrive, requeue.
    action          text    not null,
    queue_url       text    not null,
    -- Empty for a bulk action.
    message_id      text    not null,
    idempotency_key text,
    before_sha256   text,
    after_sha256    text,
    detail          text    not null
);

create index operator_actions_recorded_at on operator_actions (recorded_at desc, id desc);
