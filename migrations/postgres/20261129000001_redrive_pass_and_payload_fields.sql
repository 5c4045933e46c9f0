-- The pass of an event: which redrive (and which deliberate requeue) the latest claim came
-- from. A failed event is claimed again only by a delivery of a later pass — a new redrive
-- or a new requeue — so duplicates of one redrive are skipped instead of re-running a
-- handler that already failed (and writing a second dead letter).
alter table checkpoints
    add column requeue_generation integer not null default 0,
    add column redrive_count      integer not null default 0;

-- Short digests of the fingerprinted fields ({"/pointer": "digest", ...}) as first seen, so
-- that a payload mismatch can say which fields differ. Null when the event is not a JSON
-- object (or for rows written before this column existed).
alter table checkpoints
    add column payload_fields text;
