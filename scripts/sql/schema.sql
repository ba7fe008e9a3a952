-- Source tables of the engagement pipeline (SPEC section 2).
-- Idempotent: safe to apply to an existing database. Tests apply this file to
-- their own throw-away databases.

CREATE TABLE IF NOT EXISTS content (
  content_id     BIGINT PRIMARY KEY,
  content_type   TEXT,          -- e.g. 'video', 'podcast', 'newsletter'
  length_seconds INTEGER        -- may be NULL
);

CREATE TABLE IF NOT EXISTS engagement_events (
  id           BIGSERIAL PRIMARY KEY,
  content_id   BIGINT,          -- may name content that does not exist (yet)
  user_id      BIGINT,
  event_type   TEXT,            -- e.g. 'play', 'pause', 'finish', 'click'
  event_ts     TIMESTAMPTZ NOT NULL DEFAULT now(),
  duration_ms  INTEGER,         -- may be NULL
  device       TEXT             -- e.g. 'web', 'ios', 'android'
);

-- Debezium (pgoutput) emits the full old row in `before` for updates and
-- deletes only with REPLICA IDENTITY FULL; the default would give the key only.
ALTER TABLE content REPLICA IDENTITY FULL;
ALTER TABLE engagement_events REPLICA IDENTITY FULL;
